"""δ optimisation (docs/ALGORITHM.md §4): target working memories z_i = h_i + δ_i for one edit request.

The memory shift δ_i is added to the output of decoder layer l_WM at hook position p_i. Windows are
optimised in order; earlier, already optimised shifts stay applied and frozen.

The forward passes come from `forward.shifted_lm`: the straightforward `PlainShiftedLM`, or (fast,
default) `CachedShiftedLM`, which replays layers 0..l_WM and reuses the frozen prefix's KV cache; the
affinity λ (Eq. 12) are in `affinity`. Several requests can share each δ step's forward/backward pass
(`optimise_batch`, `batched.batched_logprobs`): more rows per read of the weights, the same results.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from muke.engine import hooks
from muke.engine.affinity import request_lambdas
from muke.engine.attention import fp32_attention
from muke.engine.batched import batched_logprobs
from muke.engine.config import AUTOCAST, MemoryConfig
from muke.engine.forward import LAYERED_CACHE, CachedShiftedLM, ShiftedLM, n_needed, shifted_lm
from muke.engine.objectives import token_coefficients
from muke.engine.windows import EditSequence, encode
from muke.model import EditableModel, cache_arg
from muke.numerics import NumericalError, check_finite


def upper_linears(em: EditableModel, layer: int) -> list[nn.Linear]:
    """The nn.Linear modules every δ step reads: those of the decoder layers above l_WM, and the LM head."""
    modules = [em.layer(i) for i in range(layer + 1, em.n_layers)] + [em.lm_head]
    return [m for module in modules for m in module.modules() if isinstance(m, nn.Linear)]


@contextmanager
def lower_precision_weights(linears: list[nn.Linear], dtype: torch.dtype):
    """Each of `linears`' weights swapped for a `dtype` copy while the block runs, the original parameters
    put back after (a tied weight, e.g. the LM head's, stays tied outside the block). Under autocast a
    product then reads the copy instead of casting the weight again at every call, which autocast does for
    weights that do not require grad: the same numbers, cast once."""
    originals = [m.weight for m in linears]
    try:
        for m, w in zip(linears, originals):
            if w.dtype != dtype:
                m.weight = nn.Parameter(w.detach().to(dtype), requires_grad=False)
        yield
    finally:
        for m, w in zip(linears, originals):
            m.weight = w


@contextmanager
def precision(em: EditableModel, cfg: MemoryConfig):
    """The forward/backward passes of the δ loop and the affinity λ under `cfg.autocast`: matrix products
    in bf16, while δ, h, the Adam state, the log-probs and the loss stay fp32 (`logprob.target_logprobs`),
    as do the weight solves, which run outside. h and the replayed lower layers come from the
    ShiftedLM's construction, outside, in the model's dtype. The weights of the layers above l_WM and of
    the LM head, which every step reads, are cast once per request (`lower_precision_weights`); with
    `cfg.fp32_attention` the attention core runs in fp32 (`attention.fp32_attention`)."""
    dtype = AUTOCAST[cfg.autocast]
    if dtype is None:
        yield
        return
    with (
        lower_precision_weights(upper_linears(em, cfg.layer), dtype),
        fp32_attention(em.model) if cfg.fp32_attention else nullcontext(),
        torch.autocast(em.device.type, dtype=dtype),
    ):
        yield


@dataclass
class MemoryResult:
    """Target memories of one request. Tensors are fp32 on CPU; n = number of windows.

    positions: (n,) hook positions; h, delta, z: (n, d_model); lambdas[i]: λ_{i,j} for j = i..n-1.
    seconds: the whole optimisation; affinity_seconds: the part spent on the affinity λ (Eq. 12).
    """

    positions: list[int]
    h: torch.Tensor
    delta: torch.Tensor
    z: torch.Tensor
    lambdas: list[list[float]]
    affinities: list[list[float]]
    trace: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    affinity_seconds: float = 0.0


# ---------------------------------------------------------------------------- the δ loop (docs/ALGORITHM.md §4)


def own_tokens(seq: EditSequence, label: int) -> slice:
    """Target tokens whose prediction the shift(s) of this loop fix for good: window `label`'s (a later
    shift sits after them), every token for the joint loop of `parallel_nll` (label -1)."""
    return slice(0, len(seq.target_ids)) if label < 0 else slice(*seq.windows[label])


def step_loss(
    coeff: torch.Tensor,
    logp: torch.Tensor,
    deltas: list[torch.Tensor],
    h_norms: list[torch.Tensor],
    cfg: MemoryConfig,
    label: int,
    step: int,
    own: slice,
) -> tuple[torch.Tensor, dict]:
    """One request's δ-loop loss -Σ c_t lp_t + wd · Σ ‖δ_k‖ / ‖h_k‖², checked finite, and its trace row
    (worst_logp: the lowest log-prob among the loop's `own` tokens)."""
    nll = -(coeff[: len(logp)] * logp).sum()
    decay = sum(cfg.v_weight_decay * d.norm() / h**2 for d, h in zip(deltas, h_norms))
    loss = nll + decay
    check_finite(f"window {label}, step {step}", loss=loss)
    return loss, {
        "window": label,
        "step": step,
        "loss": loss.item(),
        "nll": nll.item(),
        "weight_decay": decay.item(),
        "delta_norm": max(d.norm().item() for d in deltas),
        "h_norm": max(h.item() for h in h_norms),
        "worst_logp": logp[own].min().item(),
    }


def reproduces(row: dict, cfg: MemoryConfig) -> bool:
    """Every token of the loop's own window has p ≥ v_stop_prob: with v_stop_prob ≥ 0.5 each is the argmax,
    so greedy decoding with the shifts applied follows the window word for word."""
    return cfg.v_stop_prob is not None and row["worst_logp"] >= math.log(cfg.v_stop_prob)


def finished(loss: torch.Tensor, row: dict, step: int, cfg: MemoryConfig) -> bool:
    """Stop below early_stop, once the window `reproduces` (v_stop_prob set), or at the last step: the
    authors take at most steps-1 updates."""
    return loss.item() < cfg.early_stop or reproduces(row, cfg) or step == cfg.v_num_grad_steps - 1


@torch.no_grad()
def clamp_(deltas: list[torch.Tensor], h_norms: list[torch.Tensor], cfg: MemoryConfig) -> None:
    """Scale every shift longer than clamp · ‖h_k‖ back to that norm (after each Adam update)."""
    for d, h in zip(deltas, h_norms):
        limit = cfg.clamp_norm_factor * h
        norm = d.norm()
        if norm > limit:
            d.mul_(limit / norm)


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, deltas: list[torch.Tensor], h_norms, cfg) -> None:
    """One Adam update of the shifts on `loss`, then `clamp_`."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    clamp_(deltas, h_norms, cfg)


def new_shifts(lms: list[ShiftedLM], free: list[int], cfg: MemoryConfig):
    """δ = 0 at each (lms[k], free[k]), the ‖h_k‖ they are measured against, and their Adam optimiser."""
    h_norms = [lm.h([p]).norm() for lm, p in zip(lms, free)]
    deltas = [torch.zeros(lm.em.hidden_size, device=lm.em.device, requires_grad=True) for lm in lms]
    return deltas, h_norms, torch.optim.Adam(deltas, lr=cfg.v_lr)


def noisy(
    deltas: list[torch.Tensor], h_norms: list[torch.Tensor], cfg: MemoryConfig, label: int, step: int, shared=False
) -> list[torch.Tensor]:
    """The shifts a δ step applies: δ_k + σ ‖h_k‖ ε_k / √d, ε_k ~ N(0, I) drawn from a generator seeded by
    (window, step, k) (`shared`: k = 0 for every shift, one draw per request of a batch, as alone), so that a
    rerun or a δ batch draws the same noise (memory_noise σ, after NAMET); the shifts themselves for σ = 0."""
    if not cfg.memory_noise:
        return deltas
    out = []
    for k, (d, h) in enumerate(zip(deltas, h_norms)):
        seed = (label + 1) * 1_000_003 + step * 1_009 + (0 if shared else k)
        eps = torch.randn(d.shape[-1], generator=torch.Generator().manual_seed(seed)).to(d.device)
        out.append(d + eps * (cfg.memory_noise * h / d.shape[-1] ** 0.5))
    return out


def optimise_shared_shift(
    lms: list[ShiftedLM], coeff: torch.Tensor, cfg: MemoryConfig, trace: list[dict], label: int = 0
) -> torch.Tensor:
    """Window `label`'s δ for every rendering of one request at once (renderings > 1; lms[0] the question
    itself): one δ added at each rendering's hook, the loss the mean of their `step_loss`es, stopped when that
    mean is below early_stop or every rendering `reproduces` its window; ‖h‖ (weight decay, clamp, noise) is
    the question's own. MEMIT's context templates (δ shared by prefixed prompts) applied to the question."""
    coeff = coeff.to(lms[0].em.device)
    upto = n_needed(coeff)
    free = [lm.seq.hook_positions[label] for lm in lms]
    (delta,), (h_norm,), opt = new_shifts(lms[:1], free[:1], cfg)
    for step in range(cfg.v_num_grad_steps):
        (shift,) = noisy([delta], [h_norm], cfg, label, step)
        losses, rows = [], []
        for lm, p in zip(lms, free):
            logp = lm.logprobs([p], [shift], {}, upto)[0]
            loss, row = step_loss(coeff, logp, [delta], [h_norm], cfg, label, step, own_tokens(lm.seq, label))
            losses.append(loss)
            rows.append(row)
        loss = torch.stack(losses).mean()
        row = {**rows[0], "loss": loss.item(), "nll": sum(r["nll"] for r in rows) / len(rows)}
        row["worst_logp"] = min(r["worst_logp"] for r in rows)
        trace.append(row)
        if finished(loss, row, step, cfg):
            break
        descend(opt, loss, [delta], [h_norm], cfg)
    return delta.detach()


def optimise_shifts(
    lm: ShiftedLM,
    coeff: torch.Tensor,
    free: list[int],
    fixed: dict[int, torch.Tensor],
    cfg: MemoryConfig,
    trace: list[dict],
    label: int,
) -> dict[int, torch.Tensor]:
    """The δ loop over the shifts at the `free` positions, `fixed` ones applied: loss `step_loss`,
    stop when `finished`, after each Adam update `clamp_`."""
    coeff = coeff.to(lm.em.device)
    upto = n_needed(coeff)
    deltas, h_norms, opt = new_shifts([lm] * len(free), free, cfg)
    for step in range(cfg.v_num_grad_steps):
        logp = lm.logprobs(free, noisy(deltas, h_norms, cfg, label, step), fixed, upto)[0]
        loss, row = step_loss(coeff, logp, deltas, h_norms, cfg, label, step, own_tokens(lm.seq, label))
        trace.append(row)
        if finished(loss, row, step, cfg):
            break
        descend(opt, loss, deltas, h_norms, cfg)
    return {p: d.detach() for p, d in zip(free, deltas)}


def optimise_shifts_batched(
    lms: list[CachedShiftedLM],
    coeffs: list[torch.Tensor],
    free: list[int],
    fixed: list[dict[int, torch.Tensor]],
    cfg: MemoryConfig,
    traces: list[list[dict]],
    label: int,
) -> list[torch.Tensor | NumericalError]:
    """`optimise_shifts` of one free shift per request, the requests' forward/backward passes batched
    (`batched_logprobs`). Exactly the per-request loop: each δ_r is its own Adam parameter (a request that
    stops early, or fails, leaves the batch and gets no further update), with its own clamp and trace.
    Returns δ_r, or the NumericalError of a request whose loss turned non-finite."""
    coeffs = [c.to(lms[0].em.device) for c in coeffs]
    upto = [n_needed(c) for c in coeffs]
    deltas, h_norms, opt = new_shifts(lms, free, cfg)
    out: list = [None] * len(lms)
    active = list(range(len(lms)))
    for step in range(cfg.v_num_grad_steps):
        logps = batched_logprobs(
            [lms[r] for r in active],
            [free[r] for r in active],
            torch.stack(
                noisy([deltas[r] for r in active], [h_norms[r] for r in active], cfg, label, step, shared=True)
            ),
            [fixed[r] for r in active],
            [upto[r] for r in active],
        )
        going = []
        for r, logp in zip(active, logps):
            try:
                own = own_tokens(lms[r].seq, label)
                loss, row = step_loss(coeffs[r], logp[0], [deltas[r]], [h_norms[r]], cfg, label, step, own)
            except NumericalError as e:
                out[r] = e
                continue
            traces[r].append(row)
            if finished(loss, row, step, cfg):
                out[r] = deltas[r].detach()
            else:
                going.append((r, loss))
        if not going:
            break
        opt.zero_grad(set_to_none=True)  # rows that left the batch keep grad None: Adam skips them
        torch.stack([loss for _, loss in going]).sum().backward()
        opt.step()
        clamp_([deltas[r] for r, _ in going], [h_norms[r] for r, _ in going], cfg)
        active = [r for r, _ in going]
    return out


# ---------------------------------------------------------------------------- requests


def window_coefficients(seq: EditSequence, i: int, cfg: MemoryConfig, lambdas: list[list[float]]) -> torch.Tensor:
    """Token coefficients of window i's loss under the configured objective (λ for matryoshka)."""
    return token_coefficients(cfg.objective, seq, i, torch.tensor(lambdas[i]) if lambdas else None)


def _result(
    lm: ShiftedLM, shifts: dict[int, torch.Tensor], lambdas, affinities, trace, seconds: float, affinity_seconds: float
) -> MemoryResult:
    positions = lm.seq.hook_positions
    h = lm.h(positions).cpu()  # (n, d)
    delta = torch.stack([shifts[p] for p in positions]).cpu()  # (n, d)
    return MemoryResult(positions, h, delta, h + delta, lambdas, affinities, trace, seconds, affinity_seconds)


def optimise(em: EditableModel, seq: EditSequence, cfg: MemoryConfig) -> MemoryResult:
    """All target memories of one encoded request: λ first (Eq. 12), then window by window the δ loop."""
    start = time.perf_counter()
    lm = shifted_lm(em, seq, cfg.layer, cfg.fast)
    trace: list[dict] = []
    lambdas, affinities = [], []
    tick = time.perf_counter()
    with precision(em, cfg):
        if cfg.objective == "matryoshka":
            lambdas, affinities = request_lambdas(lm, cfg)
        affinity_seconds = time.perf_counter() - tick
        if cfg.objective == "parallel_nll":
            coeff = token_coefficients("parallel_nll", seq, 0)
            shifts = optimise_shifts(lm, coeff, seq.hook_positions, {}, cfg, trace, label=-1)
        else:
            shifts = {}
            for i, p in enumerate(seq.hook_positions):
                coeff = window_coefficients(seq, i, cfg, lambdas)
                if i == 0 and seq.renderings:
                    lms = [lm, *(shifted_lm(em, r, cfg.layer, cfg.fast) for r in seq.renderings)]
                    shifts[p] = optimise_shared_shift(lms, coeff, cfg, trace)
                else:
                    shifts.update(optimise_shifts(lm, coeff, [p], shifts, cfg, trace, label=i))
    return _result(lm, shifts, lambdas, affinities, trace, time.perf_counter() - start, affinity_seconds)


def can_batch(em: EditableModel, cfg: MemoryConfig) -> bool:
    """Whether `optimise_batch` batches requests: the fast path of a window-by-window objective, layers
    above l_WM, and a KV cache with per-layer entries (`forward.LAYERED_CACHE`); requests with several
    renderings (`optimise_shared_shift`) run one by one."""
    window_by_window = cfg.objective != "parallel_nll" and cfg.renderings == 1
    return cfg.fast and window_by_window and cfg.layer + 1 < em.n_layers and LAYERED_CACHE


def _one_by_one(em: EditableModel, seqs: list[EditSequence], cfg: MemoryConfig) -> list[MemoryResult | NumericalError]:
    out = []
    for seq in seqs:
        try:
            out.append(optimise(em, seq, cfg))
        except NumericalError as e:
            out.append(e)
    return out


def optimise_batch(
    em: EditableModel, seqs: list[EditSequence], cfg: MemoryConfig
) -> list[MemoryResult | NumericalError]:
    """`optimise` of several requests, their δ loops batched window by window (`optimise_shifts_batched`):
    window i of every request that has one is optimised in the same forward/backward passes. The affinity
    λ of a window depends on no other shift (Eq. 12), so each request's λ are computed first, alone.
    A request whose loss turns non-finite gets its NumericalError; the others go on. Where batching does
    not apply (`can_batch`), or for a single request, they run one by one (`optimise`). seconds: the
    batch's wall time split evenly.
    """
    if len(seqs) == 1 or not can_batch(em, cfg):
        return _one_by_one(em, seqs, cfg)
    start = time.perf_counter()
    lms = [CachedShiftedLM(em, seq, cfg.layer) for seq in seqs]
    failed: list[NumericalError | None] = [None] * len(seqs)
    lambdas: list[list] = [[] for _ in seqs]
    affinities: list[list] = [[] for _ in seqs]
    affinity_seconds = [0.0] * len(seqs)
    with precision(em, cfg):
        if cfg.objective == "matryoshka":
            for r, lm in enumerate(lms):
                tick = time.perf_counter()
                try:
                    lambdas[r], affinities[r] = request_lambdas(lm, cfg)
                except NumericalError as e:
                    failed[r] = e
                affinity_seconds[r] = time.perf_counter() - tick
        shifts: list[dict[int, torch.Tensor]] = [{} for _ in seqs]
        traces: list[list[dict]] = [[] for _ in seqs]
        for i in range(max(seq.n_windows for seq in seqs)):
            rows = [r for r, seq in enumerate(seqs) if failed[r] is None and i < seq.n_windows]
            if not rows:
                break
            coeffs = [window_coefficients(seqs[r], i, cfg, lambdas[r]) for r in rows]
            got = optimise_shifts_batched(
                [lms[r] for r in rows],
                coeffs,
                [seqs[r].hook_positions[i] for r in rows],
                [dict(shifts[r]) for r in rows],
                cfg,
                [traces[r] for r in rows],
                label=i,
            )
            for r, delta in zip(rows, got):
                if isinstance(delta, NumericalError):
                    failed[r] = delta
                else:
                    shifts[r][seqs[r].hook_positions[i]] = delta
    seconds = (time.perf_counter() - start) / len(seqs)
    return [
        failed[r] or _result(lm, shifts[r], lambdas[r], affinities[r], traces[r], seconds, affinity_seconds[r])
        for r, lm in enumerate(lms)
    ]


def encode_request(em: EditableModel, question: str, answer: str, cfg: MemoryConfig) -> EditSequence:
    """A request encoded for this model and objective (one_for_all: a single window)."""
    window = None if cfg.objective == "one_for_all" else cfg.window
    return encode(
        em.tokenizer,
        question,
        answer,
        em.end_of_turn,
        window,
        cfg.system_prompt,
        cfg.chat_template,
        cfg.key_position,
        cfg.renderings,
    )


def optimise_request(
    em: EditableModel, question: str, answer: str, cfg: MemoryConfig
) -> tuple[EditSequence, MemoryResult]:
    """Encode a request for this model and objective, then optimise its memories."""
    seq = encode_request(em, question, answer, cfg)
    return seq, optimise(em, seq, cfg)


@torch.no_grad()
def decode_with_shifts(
    em: EditableModel, seq: EditSequence, layer: int, result: MemoryResult, max_new_tokens: int | None = None
) -> list[int]:
    """Greedy continuation of the prompt with the memory shifts hooked in at their sequence positions
    (no weight update): the direct check that the target memories carry the answer.

    Incremental decoding with a KV cache; each forward pass covers positions [start, end) and gets
    the shifts that fall inside it, at their pass offsets.
    """
    max_new_tokens = max_new_tokens or len(seq.target_ids)
    eos = em.tokenizer.convert_tokens_to_ids(em.end_of_turn)
    ids = torch.tensor([seq.prompt_ids], device=em.device)  # (1, T)
    shifts = {p: d.to(em.device) for p, d in zip(result.positions, result.delta)}
    name = cache_arg(em.model)
    past, start, out = None, 0, []
    for _ in range(max_new_tokens):
        inside = [p for p in shifts if start <= p < ids.shape[1]]
        with hooks.shifts(em.layer(layer), [p - start for p in inside], [shifts[p] for p in inside]):
            step = em.model(input_ids=ids[:, start:], use_cache=True, **{name: past})
        past, start = getattr(step, name), ids.shape[1]
        token = int(step.logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return out
