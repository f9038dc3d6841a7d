"""Generation for evaluation (docs/ALGORITHM.md §6): chat template, left-padded batches, stop at end-of-turn;
greedy by default, or the paper's sampling protocol (`Decoding`).

Evaluating many single-request edits: the protocol edits a fresh model per request, answers its questions
and reverts. For low-rank (MEMIT-family) updates the same answers come from ONE batch holding the questions
of many requests, each row running its own request's edit (`row_updates`, multi-adapter style), so the
weights are never touched. Updates that change whole blocks (UnKE) are applied, answered and reverted one
at a time.

Numerics. In fp32 every edited down-projection computes y_r = W x_r + U_r (V_rᵀ x_r) for batch row r:
the same function as the merged (W + U_r V_rᵀ) x_r up to fp32 rounding (logits within ~1e-4, greedy
answers identical in our tests). In bf16/fp16 merging ROUNDS the edit (bf16(W + ΔW) keeps only part of
a small ΔW), so the low-rank form would answer differently from the protocol; there each edit's merged
weight is built once, exactly as muke.update.weights.apply builds it, and its rows are multiplied by it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from muke.engine import hooks
from muke.engine.windows import render_prompt
from muke.model import ModelError, pad
from muke.update.weights import WeightUpdate, apply

KINDS = ("question", "para_question", "sub_questions")


PROTOCOLS = ("greedy", "paper")
PAPER_TEMPERATURE = 0.001  # the authors' evaluator (PurCL/muke experiments/evaluate_uns.py)
PAPER_SEED = 2024  # its set_seed() default
# Taken from the model's generation config; where it sets none, generate uses GenerationConfig's
# documented defaults (transformers ≥ 5 keeps such fields None until generate fills them in).
SAMPLING_DEFAULTS = {"top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded.

    greedy (muke's default): argmax at every step, repetition_penalty 1 even where the model's
    generation config sets one (Qwen2.5: 1.05), so every model is decoded the same way.
    paper: what the authors' evaluator does (PurCL/muke experiments/evaluate_uns.py): do_sample=True at
    temperature 0.001 with every other setting from the model's own generation config (Qwen2.5-7B-Instruct:
    repetition_penalty 1.05, top_k 20, top_p 0.8; transformers' defaults top_k 50, top_p 1 where the config
    has none), the RNG seeded with `seed` before each generate batch (the authors seed once per run: their
    draws differ, their distribution is the same). max_new_tokens is the caller's (the paper: 512).
    """

    protocol: str = "greedy"
    seed: int = PAPER_SEED

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"generation protocol {self.protocol!r} is not one of {PROTOCOLS}")

    def kwargs(self) -> dict:
        """model.generate keyword arguments; they override the model's generation_config in every
        transformers version, and what they leave unset comes from it."""
        if self.protocol == "paper":
            return dict(do_sample=True, temperature=PAPER_TEMPERATURE, num_beams=1)
        return dict(do_sample=False, num_beams=1, repetition_penalty=1.0)

    def settings(self, em) -> dict:
        """What decodes the answers of `em`: the protocol and its effective values (for the report)."""
        if self.protocol == "greedy":
            return {"protocol": "greedy", "do_sample": False, "repetition_penalty": 1.0}
        config = em.model.generation_config
        return {
            "protocol": "paper",
            "do_sample": True,
            "temperature": PAPER_TEMPERATURE,
            **{
                k: default if getattr(config, k, None) is None else getattr(config, k)
                for k, default in SAMPLING_DEFAULTS.items()
            },
            "seed": self.seed,
        }

    @contextmanager
    def seeded(self, device) -> Iterator[None]:
        """The sampling RNG seeded with `seed` inside the block, the caller's RNG state restored after."""
        if self.protocol == "greedy":
            yield
            return
        devices = [device] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            yield


GREEDY = Decoding()


@dataclass(frozen=True)
class Generation:
    """One answer. prompt: the exact (templated) model input; n_tokens counts the end-of-turn token."""

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


def answer_length(new_ids: list[int], stops: set[int]) -> int:
    """Generated tokens up to and including the first stop token (all of them if none)."""
    return next((i + 1 for i, t in enumerate(new_ids) if t in stops), len(new_ids))


def is_low_rank(update: WeightUpdate | None) -> bool:
    """Whether an update can run per batch row: only factored down-projection updates (or no edit)."""
    return update is None or not update.params


@contextmanager
def row_updates(em, updates: Sequence[WeightUpdate | None], merged: bool | None = None) -> Iterator[None]:
    """Inside the block, batch row r of every forward pass runs the model edited by updates[r] (None: unedited).

    Each down-projection that some update edits gets a forward hook; x: (batch, T, d_ff) is its input.
    merged False: add (x_r V_r) U_rᵀ in fp32 to row r's output, V_r: (d_ff, rank), U_r: (d_model, rank),
    ranks zero-padded to the largest. merged True: rows of the same update are multiplied by that update's
    merged weight, made by muke.update.weights.apply itself (d_model × d_ff per update and layer, in the model's
    dtype). None: merged unless the model is fp32 (see the module docstring). The model's weights are
    not touched; the batch size must stay len(updates).
    """
    for u in updates:
        if not is_low_rank(u):
            raise ValueError(
                f"update of {u.request_ids} changes whole parameters ({u.backend}): it cannot be "
                "applied per batch row; apply it with muke.update.weights.apply"
            )
    merged = em.dtype != torch.float32 if merged is None else merged
    with ExitStack() as stack:
        for layer in sorted({l for u in updates if u is not None for l in u.factors}):
            W = em.down_proj_weight(layer)
            for u in updates:
                if u is not None and layer in u.factors:
                    U, V = u.factors[layer]
                    if (U.shape[0], V.shape[0]) != tuple(W.shape):
                        raise ModelError(
                            f"layer {layer}: an update of shape {(U.shape[0], V.shape[0])} does not "
                            f"fit the down-projection {tuple(W.shape)}: it was made for another model"
                        )
            hook = _merged_hook(em, layer, updates) if merged else _low_rank_hook(layer, updates, W)
            stack.enter_context(_hooked(em.down_proj(layer), hook, len(updates)))
        yield


def _low_rank_hook(layer: int, updates, W: torch.Tensor):
    edited = [(r, u.factors[layer]) for r, u in enumerate(updates) if u is not None and layer in u.factors]
    rank = max(U.shape[1] for _, (U, _) in edited)
    Us = torch.zeros(len(updates), W.shape[0], rank, device=W.device)  # (batch, d_model, rank)
    Vs = torch.zeros(len(updates), W.shape[1], rank, device=W.device)  # (batch, d_ff, rank)
    for r, (U, V) in edited:
        Us[r, :, : U.shape[1]], Vs[r, :, : V.shape[1]] = U, V

    def hook(x, output):
        correction = torch.bmm(torch.bmm(x.float(), Vs), Us.transpose(1, 2))  # (batch, T, d_model)
        return (output.float() + correction).to(output.dtype)

    return hook


def _merged_hook(em, layer: int, updates):
    module = em.down_proj(layer)
    bias = getattr(module, "bias", None)
    groups = []  # (rows, merged weight (d_model, d_ff))
    for u in {id(u): u for u in updates if u is not None and layer in u.factors}.values():
        single = WeightUpdate(u.method, u.backend, [layer], u.request_ids, {layer: u.factors[layer]})
        with apply(em, single):
            weight = em.down_proj_weight(layer).detach().clone()
        rows = torch.tensor([r for r, other in enumerate(updates) if other is u], device=weight.device)
        groups.append((rows, weight))

    def hook(x, output):
        output = output.clone()
        for rows, weight in groups:
            output[rows] = torch.nn.functional.linear(x[rows], weight, bias)
        return output

    return hook


def _hooked(module, compute, n_rows: int):
    """Replace the module's output by compute(input, output) in every forward pass inside the block."""

    def hook(_module, inputs, output):
        x = inputs[0]  # (batch, T, d_ff)
        if x.shape[0] != n_rows:
            raise RuntimeError(f"row_updates holds {n_rows} rows, the forward pass has {x.shape[0]}")
        return compute(x, output)

    return hooks.forward_hook(module, hook)


@torch.no_grad()
def _generate_batch(em, prompts: list[str], gen_kwargs: dict, decoding: Decoding) -> list[Generation]:
    tok = em.tokenizer
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask = pad(encoded, gen_kwargs["pad_token_id"], side="left")
    start = time.perf_counter()
    with decoding.seeded(em.device):
        out = em.model.generate(input_ids=ids.to(em.device), attention_mask=mask.to(em.device), **gen_kwargs)
    seconds = (time.perf_counter() - start) / len(prompts)
    stops = set(gen_kwargs["eos_token_id"])
    results = []
    for prompt, row in zip(prompts, out[:, ids.shape[1] :].tolist()):
        n = answer_length(row, stops)
        text = tok.decode(row[:n], skip_special_tokens=True).strip()
        results.append(Generation(prompt, text, n, seconds))
    return results


def greedy(em, questions: list[str], **kwargs) -> list[Generation]:
    """Greedy answers to `questions`, in order (`answers` with the greedy protocol)."""
    return answers(em, questions, decoding=GREEDY, **kwargs)


def answers(
    em,
    questions: list[str],
    max_new_tokens: int = 512,
    system_prompt: str | None = None,
    chat_template: bool = True,
    batch_size: int = 8,
    updates: Sequence[WeightUpdate | None] | None = None,
    decoding: Decoding = GREEDY,
) -> list[Generation]:
    """Answers to `questions`, in order, decoded as `decoding` says (greedy by default). Greedy batching
    does not change the outputs in fp32 (in bf16 or fp16 the accumulation order follows the batch's shape,
    and a near-tie may go the other way); the paper's sampling draws per batch, so its answers depend on
    which questions share a batch (the workflow forms batches from the edits alone: a rerun draws the same).

    updates: one low-rank WeightUpdate (or None) per question, under which that question is answered
    (`row_updates`); without it the model as it is answers every question.
    """
    if updates is not None and len(updates) != len(questions):
        raise ValueError(f"{len(updates)} updates for {len(questions)} questions")
    stops = stop_ids(em)
    pad_id = em.tokenizer.pad_token_id
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        **decoding.kwargs(),
        eos_token_id=stops,
        pad_token_id=stops[0] if pad_id is None else pad_id,
    )
    prompts = [render_prompt(em.tokenizer, q, system_prompt, chat_template) for q in questions]
    results = []
    for i in range(0, len(prompts), batch_size):
        rows = slice(i, i + batch_size)
        edited = updates is not None and any(u is not None for u in updates[rows])
        with row_updates(em, updates[rows]) if edited else nullcontext():
            results += _generate_batch(em, prompts[rows], gen_kwargs, decoding)
    return results


def _items(request, kinds) -> list[tuple[str, int, str, str]]:
    """(kind, index, question, target) for the question kinds a request has."""
    items = []
    if "question" in kinds:
        items.append(("question", 0, request.question, request.answer))
    if "para_question" in kinds and request.para_question is not None:
        items.append(("para_question", 0, request.para_question, request.answer))
    if "sub_questions" in kinds:
        items += [
            ("sub_questions", k, q, a) for k, (q, a) in enumerate(zip(request.sub_questions, request.sub_answers))
        ]
    return items


def _check_kinds(kinds) -> None:
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}; choose from {list(KINDS)}")


def n_questions(request, kinds=KINDS) -> int:
    """How many answers `generation_rows` gives for a request."""
    return len(_items(request, kinds))


def generation_rows(em, requests, kinds=KINDS, **answer_kwargs) -> list[dict]:
    """Answers (`answers`: greedy unless answer_kwargs give a decoding) for each request's questions as rows {id, kind, index, prompt, output, target, n_tokens, seconds}.

    `prompt` is the question as asked (before the chat template); `index` is the sub-question index (0 otherwise).
    """
    _check_kinds(kinds)
    keyed = [(r.id, *item) for r in requests for item in _items(r, kinds)]
    outputs = answers(em, [question for _, _, _, question, _ in keyed], **answer_kwargs)
    return _rows(keyed, outputs)


def _rows(keyed, outputs) -> list[dict]:
    return [
        dict(
            id=rid,
            kind=kind,
            index=index,
            prompt=question,
            output=g.text,
            target=target,
            n_tokens=g.n_tokens,
            seconds=g.seconds,
        )
        for (rid, kind, index, question, target), g in zip(keyed, outputs)
    ]


def edited_generation_rows(
    em, edits: Sequence[tuple[WeightUpdate | None, Sequence]], kinds=KINDS, **answer_kwargs
) -> list[list[dict]]:
    """generation_rows of each edit's requests under that edit alone, as if each edit were applied, its
    requests answered and the weights restored in turn; returns one list of rows per edit.

    edits: (update or None for the unedited model, requests). Low-rank edits share batches, each row
    under its own update (`row_updates`); other updates (UnKE) are applied and reverted one at a time.
    """
    _check_kinds(kinds)
    out: list[list[dict] | None] = [None] * len(edits)
    shared = []  # (edit index, update, key of a row)
    for e, (update, requests) in enumerate(edits):
        if is_low_rank(update):
            shared += [(e, update, (r.id, *item)) for r in requests for item in _items(r, kinds)]
        else:
            with apply(em, update):
                out[e] = generation_rows(em, requests, kinds, **answer_kwargs)
    outputs = answers(em, [key[3] for _, _, key in shared], updates=[u for _, u, _ in shared], **answer_kwargs)
    for e in range(len(edits)):
        if out[e] is None:
            out[e] = []
    for (e, _, _key), row in zip(shared, _rows([key for _, _, key in shared], outputs)):
        out[e].append(row)
    return out
