"""Tiny seeded models: build, reload through from_pretrained, ChatML template, seed determinism."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from muke.tiny import build_tiny_model

ARCHS = ["qwen2", "llama"]
SAMPLE = "Velmora's 1412 salt trade — café\n\n  exports<|im_end|>"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(arch, seed, copy) -> model folder; each built once per module."""
    root = tmp_path_factory.mktemp("tiny")
    specs = [("qwen2", 0, "a"), ("qwen2", 0, "b"), ("qwen2", 1, "a"), ("llama", 0, "a")]
    return {
        (arch, seed, copy): build_tiny_model(arch, root / f"{arch}-{seed}-{copy}", seed=seed)
        for arch, seed, copy in specs
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_and_loads(built, arch):
    path = built[(arch, 0, "a")]
    assert not path.with_name(path.name + ".tmp").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == arch
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 128, 4, 2)
    assert cfg.vocab_size == len(tok)
    tied = arch == "llama"
    assert cfg.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template(built, arch):
    tok = AutoTokenizer.from_pretrained(built[(arch, 0, "a")])
    msgs = [{"role": "user", "content": "Where is Velmora?"}]
    assert (
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\nWhere is Velmora?<|im_end|>\n<|im_start|>assistant\n"
    )
    msgs.append({"role": "assistant", "content": "On Castaran."})
    assert (
        tok.apply_chat_template(msgs, tokenize=False)
        == "<|im_start|>user\nWhere is Velmora?<|im_end|>\n<|im_start|>assistant\nOn Castaran.<|im_end|>\n"
    )
    ids = tok("<|im_start|>user\n<|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("arch", ARCHS)
def test_loaded_tokenizer_matches_trained_one(built, arch):
    """transformers may rebuild a tokenizer's pipeline per model type (it does for qwen2): it must not change ids."""
    path = built[(arch, 0, "a")]
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(path)
    assert tok(SAMPLE, add_special_tokens=False).input_ids == raw.encode(SAMPLE, add_special_tokens=False).ids
    assert tok.decode(tok(SAMPLE).input_ids) == SAMPLE


def test_same_seed_is_bit_identical(built):
    a, b = built[("qwen2", 0, "a")], built[("qwen2", 0, "b")]
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert AutoTokenizer.from_pretrained(a).get_vocab() == AutoTokenizer.from_pretrained(b).get_vocab()


def test_different_seed_differs(built):
    sa = load_file(built[("qwen2", 0, "a")] / "model.safetensors")
    sc = load_file(built[("qwen2", 1, "a")] / "model.safetensors")
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate(built, arch):
    path = built[(arch, 0, "a")]
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt").input_ids
    outs = [model.generate(ids, max_new_tokens=5, do_sample=False) for _ in range(2)]
    assert outs[0].shape[0] == 1 and ids.shape[1] < outs[0].shape[1] <= ids.shape[1] + 5
    assert torch.equal(outs[0], outs[1])
