"""Tiny seeded models (qwen2 / llama) with a locally trained ChatML tokenizer, for fast tests and the demo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from muke.data import DEFAULT_PRESERVATION, DEMO_CORPUS

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


def training_text(corpus_path: Path, tokenizer) -> torch.Tensor:
    """Token ids of the corpus documents plus the preservation set rendered as ChatML turns, so the
    pretrained model has seen the chat format and its end-of-turn token."""
    docs = [d.strip() for d in corpus_path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    chats = []
    if DEFAULT_PRESERVATION.exists():
        for line in DEFAULT_PRESERVATION.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            messages = [
                {"role": "user", "content": rec["instruction"]},
                {"role": "assistant", "content": rec["output"]},
            ]
            chats.append(tokenizer.apply_chat_template(messages, tokenize=False))
    text = "<|endoftext|>".join(docs + chats)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def pretrain(
    model, ids: torch.Tensor, steps: int, seed: int, seq_len: int = 128, batch: int = 16, lr: float = 3e-3
) -> list[float]:
    """A short seeded AdamW language-model pretraining on random windows of `ids`; returns the losses.

    A randomly initialised model has near-uniform logits and no attention pattern worth steering;
    a few hundred steps make a tiny model a (weak) language model that edits can act on.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / (steps + 1)))
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_tiny_model(
    arch: str, out_dir: str | Path, seed: int = 0, corpus_path: str | Path | None = None, pretrain_steps: int = 0
) -> Path:
    """Build a tiny model + tokenizer and save them to out_dir (replaced atomically): randomly
    initialised, then optionally pretrained for `pretrain_steps` on the corpus.

    The same seed and corpus give bit-identical weights and vocabulary.
    """
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus_path or DEMO_CORPUS)
    config = tiny_config(arch, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if pretrain_steps:
        pretrain(model, training_text(Path(corpus_path or DEMO_CORPUS), tokenizer), pretrain_steps, seed)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
