"""Greedy generation for evaluation (ALGORITHM §6): chat template, left-padded batches, stop at end-of-turn."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from muke.windows import render_prompt

KINDS = ("question", "para_question", "sub_questions")


@dataclass(frozen=True)
class Generation:
    """One greedy answer. prompt: the exact (templated) model input; n_tokens counts the end-of-turn token."""

    prompt: str
    text: str
    n_tokens: int
    seconds: float


def stop_ids(em) -> list[int]:
    """Token ids that end an answer: the end-of-turn token plus the model's generation eos ids."""
    ids = {em.tokenizer.convert_tokens_to_ids(em.end_of_turn)}
    eos = em.model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest), padded on the left."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


def answer_length(new_ids: list[int], stops: set[int]) -> int:
    """Generated tokens up to and including the first stop token (all of them if none)."""
    return next((i + 1 for i, t in enumerate(new_ids) if t in stops), len(new_ids))


@torch.no_grad()
def _generate_batch(em, prompts: list[str], gen_kwargs: dict) -> list[Generation]:
    tok = em.tokenizer
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask = left_pad(encoded, gen_kwargs["pad_token_id"])
    start = time.perf_counter()
    out = em.model.generate(input_ids=ids.to(em.device), attention_mask=mask.to(em.device), **gen_kwargs)
    seconds = (time.perf_counter() - start) / len(prompts)
    stops = set(gen_kwargs["eos_token_id"])
    results = []
    for prompt, row in zip(prompts, out[:, ids.shape[1]:].tolist()):
        n = answer_length(row, stops)
        text = tok.decode(row[:n], skip_special_tokens=True).strip()
        results.append(Generation(prompt, text, n, seconds))
    return results


def greedy(em, questions: list[str], max_new_tokens: int = 512, system_prompt: str | None = None,
           chat_template: bool = True, batch_size: int = 8) -> list[Generation]:
    """Greedy answers to `questions`, in order; batching does not change the outputs."""
    stops = stop_ids(em)
    pad_id = em.tokenizer.pad_token_id
    # Keyword arguments, not a GenerationConfig: they override the model's own generation_config in every
    # transformers version. repetition_penalty=1: plain argmax even where the model's config sets one (Qwen2.5).
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                      eos_token_id=stops, pad_token_id=stops[0] if pad_id is None else pad_id)
    prompts = [render_prompt(em.tokenizer, q, system_prompt, chat_template) for q in questions]
    results = []
    for i in range(0, len(prompts), batch_size):
        results += _generate_batch(em, prompts[i:i + batch_size], gen_kwargs)
    return results


def _items(request, kinds) -> list[tuple[str, int, str, str]]:
    """(kind, index, question, target) for the question kinds a request has."""
    items = []
    if "question" in kinds:
        items.append(("question", 0, request.question, request.answer))
    if "para_question" in kinds and request.para_question is not None:
        items.append(("para_question", 0, request.para_question, request.answer))
    if "sub_questions" in kinds:
        items += [("sub_questions", k, q, a)
                  for k, (q, a) in enumerate(zip(request.sub_questions, request.sub_answers))]
    return items


def generation_rows(em, requests, kinds=KINDS, **greedy_kwargs) -> list[dict]:
    """Greedy answers for each request's questions as rows {id, kind, index, prompt, output, target, n_tokens, seconds}.

    `prompt` is the question as asked (before the chat template); `index` is the sub-question index (0 otherwise).
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}; choose from {list(KINDS)}")
    keyed = [(r.id, *item) for r in requests for item in _items(r, kinds)]
    outputs = greedy(em, [question for _, _, _, question, _ in keyed], **greedy_kwargs)
    return [dict(id=rid, kind=kind, index=index, prompt=question, output=g.text, target=target,
                 n_tokens=g.n_tokens, seconds=g.seconds)
            for (rid, kind, index, question, target), g in zip(keyed, outputs)]
