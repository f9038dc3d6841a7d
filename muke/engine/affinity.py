"""Adaptive affinity λ_{i,j} of every window (Eq. 12, docs/ALGORITHM.md §3).

For window i: T_aff Adam steps on window i's own loss from δ = 0; at each step the gradients of every
nested target figure Y_i..Y_j; aff_{i,j} = mean over steps of cos(∇ L(Y_i), ∇ L(Y_i..Y_j)),
λ_{i,j} = 2 - aff_{i,j}. Earlier shifts are not applied and no clamp is done (authors' code).

Fast path: the gradients of all figures share one forward pass (`weighted_gradients`), split into chunks
of whole windows, and at δ = 0 one pass serves every window (`initial_figure_gradients`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from muke.engine.forward import ShiftedLM, n_needed
from muke.engine.objectives import affinity, affinity_lambdas, figure_coefficients
from muke.engine.windows import EditSequence
from muke.numerics import check_finite

if TYPE_CHECKING:
    from muke.engine.config import MemoryConfig

MIN_CHUNK = 64  # positions per chunk of a shared affinity pass; shorter ones re-read the weights too often


def chunk_cuts(seq: EditSequence, first: int) -> list[int]:
    """Window hooks after window `first`'s that split a pass into chunks of ≥ MIN_CHUNK positions."""
    cuts, last = [], seq.hook_positions[first]
    for p in seq.hook_positions[first + 1 :]:
        if p - last >= MIN_CHUNK:
            cuts.append(p)
            last = p
    return cuts


def weighted_gradients(
    lm: ShiftedLM,
    first: int,
    free: list[int],
    deltas: list[torch.Tensor],
    weights: torch.Tensor,
    inputs: list[list[torch.Tensor]],
) -> list[tuple[torch.Tensor, ...]]:
    """For each row w of `weights` (R, n_target) of coefficients over target tokens, ∇ of Σ_t w_t · NLL_t
    w.r.t. the shifts in inputs[row], with `deltas` at the `free` positions (window `first` on).

    One forward pass in chunks of whole windows (`target_states`), one backward through the LM head per
    chunk (`nll_gradients`), then per row one backward through the layers of the chunks up to its last
    weighted token only.
    """
    chunks = lm.target_states(free, deltas, chunk_cuts(lm.seq, first))
    upstream = [lm.nll_gradients(states, position) for states, position in chunks]  # [(1, n_c, d)]
    out = []
    for k, w in enumerate(weights):
        last = lm.position_of(n_needed(w) - 1)  # sequence position of its last weighted token
        used = [c for c, (_, position) in enumerate(chunks) if position <= last]
        grads = []
        for c in used:
            states, position = chunks[c]
            t0 = lm.target_index(position)
            grads.append(w[t0 : t0 + states.shape[1]].to(upstream[c])[None, :, None] * upstream[c])  # (1, n_c, d)
        out.append(
            torch.autograd.grad([chunks[c][0] for c in used], inputs[k], grads, retain_graph=k < len(weights) - 1)
        )
    return out


def figure_gradients(lm: ShiftedLM, i: int, delta: torch.Tensor, shared: bool) -> torch.Tensor:
    """∇δ of each figure's mean NLL at δ on window i's hook (no other shift applied): (N - i, d).

    shared (fast path): one forward pass for all figures (`weighted_gradients`); otherwise one
    forward/backward per figure (the straightforward path).
    """
    position = lm.seq.hook_positions[i]
    figures = figure_coefficients(lm.seq, i).to(lm.em.device)  # (N - i, n_target)
    if shared:
        d = delta.detach().clone().requires_grad_(True)
        return torch.stack([g[0] for g in weighted_gradients(lm, i, [position], [d], figures, [[d]] * len(figures))])
    grads = []
    for coeff in figures:
        d = delta.detach().clone().requires_grad_(True)
        loss = -(coeff * lm.logprobs([position], [d])[0]).sum()
        grads.append(torch.autograd.grad(loss, d)[0])
    return torch.stack(grads)


def initial_figure_gradients(lm: ShiftedLM) -> list[torch.Tensor]:
    """The first affinity step's figure gradients of every window i < N-1 at once: [(N - i, d)].

    At δ = 0 every window sees the unshifted model, so one forward pass with a zero shift at each hook
    position serves them all. Tokens before window i do not depend on δ_i (causal), hence
    ∇δ_i L(Y_i..Y_j) = c_ij · ∇δ_i S_j with S_j the summed NLL of windows 0..j and c_ij the figure's
    per-token coefficient: one backward per j gives figure j of every window, N backwards in all instead
    of a forward and N - i backwards per window.
    """
    seq = lm.seq
    windows = range(seq.n_windows - 1)
    zeros = [torch.zeros(lm.em.hidden_size, device=lm.em.device, requires_grad=True) for _ in windows]
    masks = torch.stack([seq.window_mask(0, j).float() for j in range(seq.n_windows)]).to(lm.em.device)  # (N, n_target)
    summed = weighted_gradients(
        lm, 0, [seq.hook_positions[i] for i in windows], zeros, masks, [zeros[: j + 1] for j in range(seq.n_windows)]
    )  # summed[j][i] = ∇δ_i S_j
    out = []
    for i in windows:
        scale = figure_coefficients(seq, i)[:, seq.windows[i][0]].to(lm.em.device)  # (N - i,): c_ij
        grads = torch.stack([scale[j - i] * summed[j][i] for j in range(i, seq.n_windows)])  # (N - i, d)
        check_finite(f"window {i}, step 0", affinity_gradient=grads)
        out.append(grads)
    return out


def window_affinity(lm: ShiftedLM, i: int, cfg: MemoryConfig, first: torch.Tensor | None = None) -> torch.Tensor:
    """aff_{i,j} for j = i..N-1 (Eq. 12): (N - i,). first: the figure gradients at δ = 0 when already
    known (`initial_figure_gradients`)."""
    delta = torch.zeros(lm.em.hidden_size, device=lm.em.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    g_first, g_figs = [], []
    for step in range(cfg.affinity_steps):
        if step == 0 and first is not None:
            grads = first
        else:
            grads = figure_gradients(lm, i, delta, shared=cfg.fast)  # (N - i, d)
            check_finite(f"window {i}, step {step}", affinity_gradient=grads)
        g_first.append(grads[0])
        g_figs.append(grads)
        delta.grad = grads[0].clone()
        opt.step()
    return affinity(torch.stack(g_first), torch.stack(g_figs))


def request_lambdas(lm: ShiftedLM, cfg: MemoryConfig) -> tuple[list[list[float]], list[list[float]]]:
    """λ_{i,j} and aff_{i,j} of every window i (Eq. 12). No other shift enters a window's affinity, so they
    can all be computed before any δ is optimised; on the fast path the first affinity step of every
    window comes from one shared pass (`initial_figure_gradients`)."""
    seq = lm.seq
    shared_first = cfg.fast and cfg.affinity_steps and seq.n_windows > 1
    first = initial_figure_gradients(lm) if shared_first else [None] * (seq.n_windows - 1)
    lambdas, affinities = [], []
    for i in range(seq.n_windows):
        aff = window_affinity(lm, i, cfg, first[i]) if i < seq.n_windows - 1 else torch.ones(1)
        affinities.append(aff.tolist())
        lambdas.append(affinity_lambdas(aff.cpu(), cfg.lambda_order).tolist())
    return lambdas, affinities
