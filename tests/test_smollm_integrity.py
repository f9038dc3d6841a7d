"""The shipped SmolLM2 preset on a request it was not tuned on (issue 28): UnKEBench record 55 of the shared sample
(the preset was tuned on ids 2–21), edited with μKE (MEMIT) through muke.Editor, exported, and loaded by plain
transformers. The edited model reproduces the target's first 40 tokens, and keeps the first answer token of
most unrelated chat prompts (resources/unrelated_prompts.jsonl) where the paper's key position, the chat
template's last token, changes almost all of them (docs/study/smollm2-8-integrity.md). Record 55 with
key_position question alone kept the first token of 82.5 % of the 120 prompts (study 8's probe); the bound
below lies far above the template key position's ~10 %."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import muke
from muke.data import RESOURCES, jsonl_records, load_requests
from muke.engine.windows import render_prompt

pytestmark = pytest.mark.slow
SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/unkebench/unkebench_v2_sample100.json"
RECORD = "55"
PREFIX_TOKENS = 40
PROMPTS = 40  # every third of the 120 unrelated prompts: all four kinds
MIN_AGREEMENT = 0.6  # the template key position keeps ~0.1 of them (study 8)


def first_tokens(model, tokenizer, prompts: list[str]) -> list[int]:
    """The greedy first answer token of each chat prompt, one prompt at a time (no padding)."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(int(model(ids).logits[0, -1].argmax()))
    return out


def greedy_text(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_the_shipped_preset_edits_an_untuned_record_and_keeps_unrelated_first_tokens(smollm2_path, tmp_path):
    if not SAMPLE.exists():
        pytest.skip(f"benchmark sample {SAMPLE} not available")
    (request,) = [r for r in load_requests(SAMPLE, "unkebench") if r.id == RECORD]
    editor = muke.Editor(smollm2_path, "muke-memit", device="cpu", delta_batch_size=1, progress=False)
    assert editor.memory["key_position"] == "question"  # the shipped preset's, with the question-end keys kept
    assert editor.options["template_weight"] > 0 and editor.options["template_span"] == "question"
    system = editor.chat["system_prompt"]
    render = lambda q: render_prompt(editor.tokenizer, q, system)  # noqa: E731
    unrelated = [r["question"] for r in jsonl_records(RESOURCES / "unrelated_prompts.jsonl", ("question",))][::3]
    assert len(unrelated) == PROMPTS
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    unedited = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    before = first_tokens(unedited, tokenizer, [render(q) for q in unrelated])
    target = tokenizer.decode(tokenizer(request.answer, add_special_tokens=False).input_ids[:PREFIX_TOKENS])
    assert not greedy_text(unedited, tokenizer, render(request.question), PREFIX_TOKENS + 8).startswith(target)
    del unedited

    folder = editor.edit(request, evaluate=False).export(tmp_path / "edited")
    edited = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    answer = greedy_text(edited, tokenizer, render(request.question), PREFIX_TOKENS + 8)
    assert answer.startswith(target), f"target: {target!r}\nedited: {answer!r}"
    after = first_tokens(edited, tokenizer, [render(q) for q in unrelated])
    kept = sum(a == b for a, b in zip(before, after)) / PROMPTS
    assert kept >= MIN_AGREEMENT, f"first answer token kept on {kept:.0%} of {PROMPTS} unrelated prompts"
