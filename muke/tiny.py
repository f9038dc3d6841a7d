"""Tiny seeded models (qwen2 / llama) with a locally trained ChatML tokenizer, for fast tests and the demo."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "resources" / "demo_corpus.txt"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2's pre-tokenisation (transformers 5 re-imposes it on every qwen2 tokenizer it loads, so we train with it).
SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ARCH_CONFIGS = {"qwen2": (Qwen2Config, False), "llama": (LlamaConfig, True)}  # class, tie_word_embeddings


def train_tokenizer(corpus_path: str | Path, vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on one text file (deterministic), wrapped with ChatML specials and template."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus_path)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,
    )


def tiny_config(arch: str, tokenizer: PreTrainedTokenizerFast):
    """4 layers, hidden 128, 4 heads / 2 kv heads; qwen2 has an untied lm_head, llama a tied one."""
    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {sorted(ARCH_CONFIGS)}")
    config_cls, tied = ARCH_CONFIGS[arch]
    return config_cls(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_model(arch: str, out_dir: str | Path, seed: int = 0, corpus_path: str | Path | None = None) -> Path:
    """Build a randomly initialised tiny model + tokenizer and save them to out_dir (replaced atomically).

    The same seed and corpus give bit-identical weights and vocabulary.
    """
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus_path or DEFAULT_CORPUS)
    config = tiny_config(arch, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
