"""Causal tracing (Meng et al. 2022, ROME §2.1), adapted to long-form answers.

Three kinds of run over one edit request's teacher-forced sequence (muke.engine.windows: prompt ++ target
minus its last token):
- clean: the model as is; every traced state is recorded;
- corrupted: the question tokens' input embeddings plus Gaussian noise ε ~ N(0, (k·σ)²), σ the std of the
  input embeddings over the vocabulary (`embedding_std`), k = 3 as in ROME; `samples` noise samples;
- restored: a corrupted run with one state at one layer set back to its clean value at a set of
  positions: the decoder layer's output (`hidden`, the residual stream), its MLP output (`mlp`, the
  down-projection's) or its attention output (`attn`, the output projection's).

The measure is the mean log-probability of the target tokens over the first window (W tokens) and over
the whole answer, each averaged over the noise samples; a restoration's effect is the share of the clean
log-probability it brings back, (lp_restored − lp_corrupted) / (lp_clean − lp_corrupted).

Positions are grouped as the paper's memory positions (`position_groups`): the question's tokens (ROME's
subject), the last question token, the last prompt token (where δ_1 sits) and the later windows' starts
(δ_2..δ_N, `EditSequence.hook_positions`).

Batching: every (restoration, noise sample) is one row of a forward pass. A row restored at layer l
replays layers 0..l-1 from the corrupted run of its noise sample (hooks.replay_lower_layers): nothing
below l differs from that run, so only layers l..L-1 are computed again.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace

import torch

from muke.engine import hooks
from muke.engine.windows import EditSequence, encode
from muke.model import EditableModel

COMPONENTS = ("hidden", "mlp", "attn")
GROUPS = ("question", "last_question", "last_prompt", "window_starts")


@dataclass(frozen=True)
class TraceConfig:
    """What a trace restores and how it corrupts (defaults: ROME's noise level, every layer)."""

    noise: float = 3.0  # k: the noise std is k·σ of the input embeddings
    samples: int = 3  # noise samples per request
    seed: int = 0  # of the noise generator, restarted for every request
    components: tuple[str, ...] = COMPONENTS
    layers: tuple[int, ...] | None = None  # None: every layer
    batch_size: int = 16  # rows per forward pass
    max_target_tokens: int | None = None  # trace the first N target tokens only (None: the whole answer)

    def __post_init__(self):
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad or not self.components:
            raise ValueError(f"trace components {list(self.components)}: expected some of {COMPONENTS}")
        if self.samples < 1 or self.batch_size < 1 or self.noise < 0:
            raise ValueError("trace samples and batch_size must be ≥ 1 and noise ≥ 0")
        if self.max_target_tokens is not None and self.max_target_tokens < 1:
            raise ValueError(f"max_target_tokens must be ≥ 1, got {self.max_target_tokens}")


@dataclass(frozen=True)
class Restoration:
    """Set `component` of decoder layer `layer` back to its clean value at `positions` (none: the corrupted run)."""

    component: str
    layer: int
    positions: tuple[int, ...]


def traced_module(em: EditableModel, component: str, layer: int) -> torch.nn.Module:
    """The module whose output a restoration of `component` at `layer` replaces (names from the adapter)."""
    return {"hidden": em.layer, "mlp": em.down_proj, "attn": em.attn_out}[component](layer)


def embedding_std(em: EditableModel, chunk: int = 8192) -> float:
    """σ of the input embedding module's outputs over the whole vocabulary (scaled embeddings included)."""
    embed = em.model.get_input_embeddings()
    total = square = count = 0.0
    with torch.no_grad():
        for start in range(0, embed.num_embeddings, chunk):
            x = embed(torch.arange(start, min(start + chunk, embed.num_embeddings), device=em.device)).double()
            total, square, count = total + x.sum().item(), square + x.square().sum().item(), count + x.numel()
    return math.sqrt(square / count - (total / count) ** 2)


def question_positions(tokenizer, seq: EditSequence, question: str) -> tuple[int, ...]:
    """Positions of the prompt tokens that spell `question`, from the tokenizer's character offsets."""
    enc = tokenizer(seq.prompt, add_special_tokens=False, return_offsets_mapping=True)
    if tuple(enc["input_ids"]) != seq.prompt_ids:
        raise ValueError("the prompt re-tokenized with offsets gives other tokens than its encoding")
    start = seq.prompt.rfind(question.strip())
    if start < 0:
        raise ValueError(f"question {question!r} is not in its prompt {seq.prompt!r}")
    end = start + len(question.strip())
    return tuple(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start)


def position_groups(seq: EditSequence, question: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """{group: positions} of the groups this request has (`window_starts` needs two windows or more)."""
    groups = {
        "question": question,
        "last_question": question[-1:],
        "last_prompt": tuple(seq.hook_positions[:1]),
        "window_starts": tuple(seq.hook_positions[1:]),
    }
    return {g: p for g, p in groups.items() if p}


def truncated(seq: EditSequence, n: int | None) -> EditSequence:
    """`seq` with its target cut to the first n tokens (windows clipped); n None: `seq` itself."""
    if n is None or n >= len(seq.target_ids):
        return seq
    windows = tuple((s, min(e, n)) for s, e in seq.windows if s < n)
    return replace(seq, target_ids=seq.target_ids[:n], windows=windows)


class RequestTrace:
    """The clean and corrupted runs of one sequence, and restored runs batched over restorations.

    `corrupt`: the positions whose input embeddings get noise; `sigma`: `embedding_std`. Log-probs are of
    the target tokens, fp32: clean (n,), corrupted (samples, n), `restored` (restorations, samples, n).
    """

    def __init__(self, em: EditableModel, seq: EditSequence, corrupt: tuple[int, ...], cfg: TraceConfig, sigma: float):
        self.em, self.seq, self.cfg = em, seq, cfg
        self.layers = list(range(em.n_layers)) if cfg.layers is None else sorted(cfg.layers)
        for layer in self.layers:
            em.check_layer(layer)
        ids = seq.input_ids.to(em.device)
        self.targets = torch.tensor(seq.target_ids, device=em.device)
        with torch.no_grad():
            embeds = em.model.get_input_embeddings()(ids)  # (1, T, d)
        gen = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn(cfg.samples, len(corrupt), embeds.shape[-1], generator=gen) * (cfg.noise * sigma)
        self.noisy = embeds.repeat(cfg.samples, 1, 1)  # (S, T, d)
        self.noisy[:, list(corrupt)] += noise.to(embeds.device, embeds.dtype)
        self.clean_logprobs, self.clean = self._clean_run(embeds)
        self.corrupted_logprobs, self.corrupted = self._corrupted_run()

    @torch.no_grad()
    def _logprobs(self, embeds: torch.Tensor) -> torch.Tensor:
        """log p of the target tokens for each row of `embeds` (B, T, d): (B, n)."""
        n = len(self.seq.target_ids)
        logits = self.em.model(inputs_embeds=embeds, use_cache=False, logits_to_keep=n).logits.float()  # (B, n, V)
        picked = logits.gather(-1, self.targets.expand(logits.shape[0], -1)[..., None])[..., 0]
        return picked - logits.logsumexp(-1)

    def _run_capturing(self, embeds: torch.Tensor, modules: dict) -> tuple[torch.Tensor, dict]:
        with ExitStack() as stack:
            seen = {key: stack.enter_context(hooks.capture(m)) for key, m in modules.items()}
            kinds = []
            stack.enter_context(hooks.forward_hook(self.em.layer(0), lambda _m, _i, o: kinds.append(type(o))))
            logprobs = self._logprobs(embeds)
        self._as_tuple = kinds[0] is tuple
        return logprobs, {key: s[0] for key, s in seen.items()}

    def _clean_run(self, embeds: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Clean log-probs (n,) and {(component, layer): its clean output (T, d)}."""
        modules = {(c, l): traced_module(self.em, c, l) for c in self.cfg.components for l in self.layers}
        logprobs, states = self._run_capturing(embeds, modules)
        return logprobs[0], {key: s[0] for key, s in states.items()}

    def _corrupted_run(self) -> tuple[torch.Tensor, dict]:
        """Corrupted log-probs (S, n) and {layer: the corrupted output (S, T, d)} of the layers replayed."""
        below = sorted({layer - 1 for layer in self.layers if layer > 0})
        return self._run_capturing(self.noisy, {layer: self.em.layer(layer) for layer in below})

    def restored(self, restorations: list[Restoration]) -> torch.Tensor:
        """log p of the target tokens with each restoration, for each noise sample: (R, S, n)."""
        rows = [(k, r, s) for k, r in enumerate(restorations) for s in range(self.cfg.samples)]
        out = torch.empty(len(restorations), self.cfg.samples, len(self.seq.target_ids))
        for layer in sorted({r.layer for r in restorations}):
            if layer not in self.layers:
                raise ValueError(f"restoration at layer {layer}, which this trace does not record")
            at = [row for row in rows if row[1].layer == layer]
            for start in range(0, len(at), self.cfg.batch_size):
                chunk = at[start : start + self.cfg.batch_size]
                lp = self._restored_chunk(layer, [r for _, r, _ in chunk], [s for _, _, s in chunk])
                for (k, _, s), row in zip(chunk, lp):
                    out[k, s] = row.cpu()
        return out

    def _restored_chunk(self, layer: int, restorations: list[Restoration], samples: list[int]) -> torch.Tensor:
        """One forward pass: row b is noise sample samples[b] with restorations[b], all at `layer`: (B, n)."""
        T = self.noisy.shape[1]
        with ExitStack() as stack:
            if layer > 0:
                replayed = self.corrupted[layer - 1][samples]  # (B, T, d)
                stack.enter_context(hooks.replay_lower_layers(self.em.layers, layer - 1, replayed, self._as_tuple))
            for component in {r.component for r in restorations}:
                mask = torch.zeros(len(restorations), T, dtype=torch.bool)  # (B, T)
                for b, r in enumerate(restorations):
                    if r.component == component:
                        mask[b, list(r.positions)] = True
                module = traced_module(self.em, component, layer)
                stack.enter_context(hooks.restores(module, self.clean[component, layer], mask))
            return self._logprobs(self.noisy[samples])


def trace_request(
    em: EditableModel,
    request,
    cfg: TraceConfig,
    sigma: float,
    window: int | None,
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> list[dict]:
    """Effect rows of one request: one per (component, layer, position group) restored (module docstring)."""
    begin = time.perf_counter()
    seq = encode(em.tokenizer, request.question, request.answer, em.end_of_turn, window, system_prompt, chat_template)
    seq = truncated(seq, cfg.max_target_tokens)
    question = question_positions(em.tokenizer, seq, request.question)
    groups = position_groups(seq, question)
    run = RequestTrace(em, seq, question, cfg, sigma)
    keys = [(c, layer, g) for layer in run.layers for c in cfg.components for g in groups]
    lp = run.restored([Restoration(c, layer, groups[g]) for c, layer, g in keys])  # (R, S, n)
    first = seq.window_mask(0)

    def measures(logprobs: torch.Tensor) -> tuple[float, float]:  # (..., n) → (first window, answer) means
        return float(logprobs[..., first].mean()), float(logprobs.mean())

    clean, corrupted = measures(run.clean_logprobs.cpu()), measures(run.corrupted_logprobs.cpu())
    seconds = time.perf_counter() - begin
    rows = []
    for (component, layer, group), restored in zip(keys, lp):
        window_lp, answer_lp = measures(restored)
        rows.append(
            {
                "id": request.id,
                "component": component,
                "layer": layer,
                "group": group,
                "n_positions": len(groups[group]),
                "n_target": len(seq.target_ids),
                "window_logp": window_lp,
                "answer_logp": answer_lp,
                "clean_window_logp": clean[0],
                "clean_answer_logp": clean[1],
                "corrupted_window_logp": corrupted[0],
                "corrupted_answer_logp": corrupted[1],
                "seconds": seconds,
            }
        )
    return rows


def trace(
    em: EditableModel,
    requests: list,
    cfg: TraceConfig,
    window: int | None,
    system_prompt: str | None = None,
    chat_template: bool = True,
    progress=None,
):
    """Effect rows of every request as one DataFrame (`trace_request`); `progress(message)` after each."""
    import pandas as pd

    sigma = embedding_std(em)
    rows = []
    for k, request in enumerate(requests):
        done = trace_request(em, request, cfg, sigma, window, system_prompt, chat_template)
        rows += done
        if progress:
            progress(f"traced {request.id} ({k + 1}/{len(requests)}) in {done[0]['seconds']:.1f} s")
    return pd.DataFrame(rows).assign(noise_std=cfg.noise * sigma)
