"""The template's keys preserved (docs/ALGORITHM.md §5, "Template preservation"): the second moment C_t of the
down_proj inputs at the chat template's own positions of many unrelated chat prompts.

A chat prompt ends with template tokens every prompt shares (ChatML's "<|im_end|>\\n<|im_start|>assistant\\n"),
whose keys are nearly the same in every prompt: an update written at one of them fires on every prompt. The
template prompts are distinct sentences of the project's demo corpus, each the user turn of a prompt rendered
with the run's chat settings (render_prompt: system_prompt, chat_template), none of them an evaluation prompt
(resources/unrelated_prompts.jsonl, unrelated_questions.jsonl). Their template positions are the tokens after
the user's text: question_end + 1 … len(prompt) - 1, the last being where key_position "template" writes;
with span "question" from question_end on, the user's text's last token too, where key_position "question"
writes: a prompt of the same form as the edit's has its key there close to the edit key.

C_t = (1 / n) Σ k kᵀ over those positions, per edited layer, is kept as a `Stats` (the sums and counts of
muke.update.stats) in the muke cache, keyed by the model's weights, the layers, the prompts and the chat
settings, and attached to the run's statistics (`Stats.cache`) once per process.
"""

from __future__ import annotations

import hashlib
import json

import torch

from muke.data import DEMO_CORPUS, RESOURCES, jsonl_records
from muke.engine.windows import question_end, render_prompt
from muke.io import cache_dir, write_safetensors
from muke.model import EditableModel, pad
from muke.update.corpus import _subset, load_corpus, sentences
from muke.update.stats import (
    Stats,
    StatsError,
    accumulate,
    architecture,
    d_ff,
    load_stats,
    model_fingerprint,
    sum_tensors,
    vocab_hash,
)

TEMPLATE_PROMPTS = 1000  # template prompts when template_weight > 0 (option template_prompts)
SPANS = ("template", "question")  # option template_span: the preserved positions start after / at question_end
EVALUATION_PROMPTS = (RESOURCES / "unrelated_prompts.jsonl", RESOURCES / "unrelated_questions.jsonl")
FORMAT = "muke.template-stats/1"
BATCH = 64  # prompts per forward pass


def template_questions(n: int = TEMPLATE_PROMPTS, seed: int = 0) -> list[str]:
    """n distinct sentences of the demo corpus (a seeded subset, in corpus order), none an evaluation prompt."""
    docs, _ = load_corpus(DEMO_CORPUS)
    held_out = {r["question"].strip() for path in EVALUATION_PROMPTS for r in jsonl_records(path, ("question",))}
    pool = [s for s in dict.fromkeys(s for doc in docs for s in sentences(doc)) if s not in held_out]
    if n < 1 or n > len(pool):
        raise ValueError(f"template_prompts must be 1 … {len(pool)} (the demo corpus's sentences), got {n}")
    return [pool[i] for i in _subset(len(pool), n, seed)]


def template_positions(
    tokenizer, question: str, system_prompt: str | None = None, chat_template: bool = True, span: str = "template"
) -> tuple[list[int], list[int]]:
    """(prompt ids, template positions): the question rendered as an edit prompt is, and the indices of the
    tokens after the user's text (question_end + 1 … len - 1; none for a plain prompt), from question_end on
    with span "question"."""
    if span not in SPANS:
        raise ValueError(f"template_span must be one of {SPANS}, got {span!r}")
    prompt = render_prompt(tokenizer, question, system_prompt, chat_template)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    end = question_end(tokenizer, prompt, tuple(ids), question)
    if end == len(ids) - 1:  # a plain prompt: no template tokens
        return ids, []
    return ids, list(range(end + (span == "template"), len(ids)))


def template_sums(
    em: EditableModel,
    layers: list[int],
    questions: list[str],
    system_prompt: str | None,
    chat_template: bool,
    span: str = "template",
) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """({layer: Σ k kᵀ (d_ff, d_ff) fp32, upper triangle valid}, {layer: count}) over the template positions
    of `questions`, right-padded batches of BATCH prompts, all layers in one pass (stats.accumulate)."""
    encoded = [template_positions(em.tokenizer, q, system_prompt, chat_template, span) for q in questions]
    size = d_ff(em)
    sums = {l: torch.zeros(size, size, dtype=torch.float32, device=em.device) for l in layers}
    counts = {l: 0 for l in layers}
    for start in range(0, len(encoded), BATCH):
        chunk = encoded[start : start + BATCH]
        ids, mask = pad([e[0] for e in chunk], em.pad_id)
        keep = torch.zeros(ids.shape, dtype=torch.bool)
        for row, (_, positions) in enumerate(chunk):
            keep[row, positions] = True
        accumulate(em, layers, {"input_ids": ids, "attention_mask": mask}, keep, sums, counts)
    return sums, counts


def template_stats(
    em: EditableModel,
    layers,
    n: int = TEMPLATE_PROMPTS,
    system_prompt: str | None = None,
    chat_template: bool = True,
    span: str = "template",
) -> Stats:
    """C_t's sums for `layers` from the muke cache, or computed into it (`template_sums`)."""
    layers = sorted(set(layers))
    questions = template_questions(n)
    job = {
        "format": FORMAT,
        "model": str(em.model.config._name_or_path),
        **architecture(em),
        "model_fingerprint": model_fingerprint(em),
        "tokenizer_vocab_sha256": vocab_hash(em.tokenizer),
        "layers": layers,
        "n_prompts": n,
        "prompts_sha256": hashlib.sha256(json.dumps(questions).encode()).hexdigest(),
        "system_prompt": system_prompt,
        "chat_template": chat_template,
        **({"span": span} if span != "template" else {}),  # C_t cached before the option keeps its name
    }
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / "stats" / f"{em.model_type}-template-L{'-'.join(map(str, layers))}-{digest}.safetensors"
    if not path.exists():
        sums, counts = template_sums(em, layers, questions, system_prompt, chat_template, span)
        if not counts[layers[0]]:
            raise StatsError("template_weight: the prompts have no template tokens (no chat template)")
        write_safetensors(path, sum_tensors(sums, counts), {"muke": json.dumps({**job, "complete": True})})
    return load_stats(path, em, layers)


def attached_template(
    em: EditableModel,
    stats: Stats,
    layers,
    n: int,
    system_prompt: str | None,
    chat_template: bool,
    span: str = "template",
) -> Stats:
    """`template_stats` kept in the run's statistics' cache: computed (or read) once per process, on the
    model as it is at the first update, as C is collected on the unedited model."""
    key = ("template", tuple(sorted(set(layers))), n, system_prompt, chat_template, span)
    if key not in stats.cache:
        stats.cache[key] = template_stats(em, layers, n, system_prompt, chat_template, span)
    return stats.cache[key]


def attach_template(em: EditableModel, stats: Stats | None, options: dict) -> None:
    """C_t of a run whose backend options ask for it (template_weight > 0) attached to its statistics before
    the first edit, so that a sequence resumed after some edits reads the C_t of the unedited model too."""
    if stats is not None and options.get("template_weight"):
        n = options.get("template_prompts", TEMPLATE_PROMPTS)
        chat = options.get("system_prompt"), options.get("chat_template", True)
        attached_template(em, stats, options["layers"], n, *chat, options.get("template_span", "template"))
