"""δ optimisation (ALGORITHM §4): target working memories z_i = h_i + δ_i for one edit request.

The memory shift δ_i is added to the output of decoder layer l_WM at hook position p_i. Windows are
optimised in order; earlier, already optimised shifts stay applied and frozen.

Fast path (default): layers 0..l_WM never depend on δ, so they run once per request and every step
replays their output (hooks.replay_lower_layers), running only the layers above; the affinity
gradients of all target figures share one forward pass, and at δ = 0 (the first affinity step) one
forward pass serves every window. Several requests can share each δ step's forward/backward pass
(`optimise_batch`): more rows per read of the weights, the same results.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from muke.engine import hooks
from muke.model import EditableModel, cache_arg
from muke.engine.objectives import OBJECTIVES, affinity, affinity_lambdas, figure_coefficients, token_coefficients
from muke.engine.windows import EditSequence, encode
from muke.numerics import NumericalError, check_finite


@dataclass(frozen=True)
class MemoryConfig:
    """Hyperparameters of the δ loop; defaults are the authors' (ALGORITHM §4)."""

    layer: int                      # l_WM: δ is added to this decoder layer's output
    objective: str = "matryoshka"
    window: int | None = 20         # W tokens per window; ignored by one_for_all
    lambda_order: str = "reference"
    affinity_steps: int = 3         # T_aff
    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    early_stop: float = 1e-2        # 5e-3 for UnKE-based edits
    system_prompt: str | None = None
    chat_template: bool = True
    fast: bool = True

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {OBJECTIVES}")


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


MIN_CHUNK = 64      # positions per chunk of a shared affinity pass; shorter ones re-read the weights too often


class ShiftedLM:
    """Log-probs of the target tokens of one sequence with memory shifts at layer l_WM's output.

    Fast path: (1) layers 0..l_WM run once (their output never depends on a shift) and are replayed;
    (2) positions before the first free shift see only frozen inputs, so their keys/values and
    logits are computed once per set of frozen shifts and reused as a KV-cache prefix: each step
    runs the upper layers on the suffix from the first free shift on.
    """

    def __init__(self, em: EditableModel, seq: EditSequence, layer: int, fast: bool = True):
        self.em, self.seq, self.layer, self.fast = em, seq, layer, fast
        self.input_ids = seq.input_ids.to(em.device)
        self.targets = torch.tensor(seq.target_ids, device=em.device)
        self.first_target = len(seq.prompt_ids) - 1      # input position predicting target token 0
        seen = []
        with torch.no_grad(), hooks.stop_after(em.layer(layer), seen):
            em.model(input_ids=self.input_ids, use_cache=False)
        self.hidden = hooks.hidden_of(seen[0])    # (1, T, d): unshifted output of layer l_WM
        self._as_tuple = isinstance(seen[0], tuple)
        self._prefix_key, self._prefix = None, None

    def h(self, positions: list[int]) -> torch.Tensor:
        """Unshifted hidden states at the given positions: (n, d), fp32."""
        return self.hidden[0, positions].float()

    def _target_logprobs(self, logits: torch.Tensor, first_position: int) -> torch.Tensor:
        """log p of the target tokens predicted by logits of input positions first_position..: (B, n)."""
        t0 = first_position - self.first_target
        logp = logits.float().log_softmax(-1)
        targets = self.targets[t0:t0 + logp.shape[1]].expand(logp.shape[0], -1)
        return logp.gather(-1, targets[..., None])[..., 0]

    @torch.no_grad()
    def prefix(self, start: int, fixed: dict[int, torch.Tensor]):
        """KV cache and target log-probs of input positions [0, start) with the frozen shifts."""
        key = (start, tuple(fixed), tuple(d.data_ptr() for d in fixed.values()))
        if self._prefix_key != key:
            with hooks.shifts(self.em.layer(self.layer), list(fixed), list(fixed.values())):
                out = self.em.model(input_ids=self.input_ids[:, :start], use_cache=True)
            lp = self._target_logprobs(out.logits[:, self.first_target:], self.first_target)
            self._prefix_key, self._prefix = key, (getattr(out, cache_arg(self.em.model)), lp)
        return self._prefix

    def _forward(self, free: list[int], deltas: list[torch.Tensor], fixed: dict[int, torch.Tensor],
                 upto: int | None = None, **kwargs):
        """The model's forward pass with the shifts: (output, first input position it covers).

        Fast path: the suffix from the first free shift on, on the prefix's KV cache, lower layers replayed;
        upto: only targets [0, upto) are needed, so the sequence stops after the position predicting the
        last of them (later positions cannot change earlier log-probs).
        """
        if not self.fast:
            with hooks.shifts(self.em.layer(self.layer), list(fixed) + free, list(fixed.values()) + deltas):
                return self.em.model(input_ids=self.input_ids, use_cache=False, **kwargs), 0
        start = min(free)
        if any(p >= start for p in fixed):
            raise ValueError("frozen shifts must precede every free shift")
        cache = copy.deepcopy(self.prefix(start, fixed)[0]) if start > 0 else None
        end = self.input_ids.shape[1] if upto is None else self.first_target + upto
        return self._run(start, end, free, deltas, cache, **kwargs), start

    def _run(self, start: int, end: int, free: list[int], deltas: list[torch.Tensor], cache, **kwargs):
        """Input positions [start, end) through the layers above l_WM on `cache` (positions before start),
        the shifts that fall inside the range added."""
        inside = [k for k, p in enumerate(free) if start <= p < end]
        with hooks.shifts(self.em.layer(self.layer), [free[k] - start for k in inside], [deltas[k] for k in inside]), \
                hooks.replay_lower_layers(self.em.layers, self.layer, self.hidden[:, start:end], self._as_tuple):
            return self.em.model(input_ids=self.input_ids[:, start:end], use_cache=cache is not None,
                                 **{cache_arg(self.em.model): cache}, **kwargs)

    def logprobs(self, free: list[int], deltas: list[torch.Tensor],
                 fixed: dict[int, torch.Tensor] | None = None, upto: int | None = None) -> torch.Tensor:
        """log p(target_t) with `deltas` at the `free` positions and the `fixed` shifts: (1, len(target)),
        or (1, upto) on the fast path when only targets [0, upto) are needed."""
        fixed = fixed or {}
        if not self.fast:
            out, _ = self._forward(free, deltas, fixed, logits_to_keep=len(self.seq.target_ids))
            return self._target_logprobs(out.logits, self.first_target)
        out, start = self._forward(free, deltas, fixed, upto)
        first = max(start, self.first_target)
        logits = out.logits if first == start else out.logits[:, first - start:]     # no slice: no full-size grad copy
        lp = self._target_logprobs(logits, first)
        if start > 0:
            lp = torch.cat([self.prefix(start, fixed)[1], lp], dim=1)
        return lp

    def target_states(self, free: list[int], deltas: list[torch.Tensor],
                      cuts: list[int] = ()) -> list[tuple[torch.Tensor, int]]:
        """The LM head's input (the final norm's output), kept in the autograd graph, at the positions
        that predict targets, with `deltas` at the `free` positions: [((1, n, d), input position of row 0)],
        one entry per chunk. On the fast path the rows start at the first free shift, and the pass is split
        at the input positions `cuts`: each chunk runs on the KV cache of the chunks before it, so a
        backward from a chunk's rows does not run through the later chunks. The head itself is left out.
        """
        start = min(free)
        if not (self.fast and cuts and start > 0 and self._chunkable):
            with hooks.capture(self.em.final_norm, "output", detach=False) as seen:
                _, start = self._forward(free, deltas, {}, logits_to_keep=1)
            first = max(start, self.first_target)
            return [(seen[-1][:, first - start:], first)]          # the last call: the prefix may run before it
        bounds = [start] + [c for c in cuts if c > start] + [self.input_ids.shape[1]]
        cache = copy.deepcopy(self.prefix(start, {})[0])
        chunks = []
        for a, b in zip(bounds, bounds[1:]):
            _sync_skipped_layers(cache, self.layer)
            with hooks.capture(self.em.final_norm, "output", detach=False) as seen:
                out = self._run(a, b, free, deltas, cache, logits_to_keep=1)
            cache = getattr(out, cache_arg(self.em.model))
            first = max(a, self.first_target)
            chunks.append((seen[-1][:, first - a:], first))
        return chunks

    @property
    def _chunkable(self) -> bool:
        """Whether the KV cache has per-layer entries (transformers ≥ 4.56) and there are layers above l_WM."""
        return hasattr(DynamicCache(), "layers") and self.layer + 1 < self.em.n_layers

    def nll_gradients(self, states: torch.Tensor, first: int) -> torch.Tensor:
        """Row t: ∇ of target token t's NLL w.r.t. its own row of `states` (no other row changes it), for
        the rows `target_states` returned: (1, n, d). One backward through the LM head for every token."""
        x = states.detach().requires_grad_(True)
        nll = -self._target_logprobs(self.em.head_logits(x), first).sum()
        return torch.autograd.grad(nll, x)[0]


def batched_logprobs(lms: list[ShiftedLM], free: list[int], deltas: torch.Tensor, fixed: list[dict[int, torch.Tensor]],
                     upto: list[int | None]) -> list[torch.Tensor]:
    """`ShiftedLM.logprobs` of several requests in ONE forward pass: row r is request lms[r] with deltas[r]
    at its free position free[r] and its frozen shifts fixed[r] (all before free[r]): [(1, n_r)].

    Each row runs its suffix from free[r] on the KV cache of its own prefix (`ShiftedLM.prefix`); the
    prefixes are right-aligned at the longest one and the suffixes left-aligned, padding masked out, each
    row with its own position ids. Rows never mix, so a row's log-probs and gradients are its request's
    alone: more rows share one read of the weights and larger matrix products (the point of batching).
    """
    em, layer = lms[0].em, lms[0].layer
    device = em.device
    starts = list(free)
    ends = [lm.input_ids.shape[1] if u is None else lm.first_target + u for lm, u in zip(lms, upto)]
    lengths = [e - s for s, e in zip(starts, ends)]
    width_p, width_s = max(starts), max(lengths)
    prefixes = [lm.prefix(s, f) if s > 0 else (None, None) for lm, s, f in zip(lms, starts, fixed)]
    mask = torch.zeros(len(lms), width_p + width_s, dtype=torch.long, device=device)
    ids = torch.zeros(len(lms), width_s, dtype=torch.long, device=device)
    hidden = lms[0].hidden.new_zeros(len(lms), width_s, lms[0].hidden.shape[-1])
    targets = torch.zeros(len(lms), width_s, dtype=torch.long, device=device)      # the token each position predicts
    for r, (lm, s, n) in enumerate(zip(lms, starts, lengths)):
        mask[r, width_p - s:] = 1            # padding after a suffix is seen by later padding only (causal)
        ids[r, :n] = lm.input_ids[0, s:s + n]
        hidden[r, :n] = lm.hidden[0, s:s + n]
        first = max(s, lm.first_target)
        targets[r, first - s:n] = lm.targets[first - lm.first_target:s + n - lm.first_target]
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(width_s, device=device)
    cache = _padded_cache([c for c, _ in prefixes], starts, width_p, em) if width_p else None
    with hooks.shifts(em.layer(layer), [0], [deltas]), \
            hooks.replay_lower_layers(em.layers, layer, hidden, lms[0]._as_tuple):
        logits = em.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          use_cache=cache is not None, **{cache_arg(em.model): cache}).logits
    logp = logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]      # sliced after: no full-size grads
    out = []
    for r, (lm, s, n) in enumerate(zip(lms, starts, lengths)):
        lp = logp[r:r + 1, max(s, lm.first_target) - s:n]
        out.append(torch.cat([prefixes[r][1], lp], dim=1) if s > 0 else lp)
    return out


def _padded_cache(caches: list, lengths: list[int], width: int, em: EditableModel) -> DynamicCache:
    """One KV cache for a batch of prefixes: request r's keys/values right-aligned at `width` positions,
    zeros before them (masked out by the attention mask)."""
    batched = DynamicCache()
    for layer in range(em.n_layers):
        keys, values = [], []
        for cache, n in zip(caches, lengths):
            if cache is None:
                ref = next(c for c in caches if c is not None).layers[layer].keys
                k = v = ref.new_zeros(1, ref.shape[1], 0, ref.shape[3])
            else:
                k, v = cache.layers[layer].keys[:, :, :n], cache.layers[layer].values[:, :, :n]
            keys.append(torch.nn.functional.pad(k, (0, 0, width - n, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, width - n, 0)))
        batched.update(torch.cat(keys), torch.cat(values), layer)
    return batched


def _sync_skipped_layers(cache, layer: int) -> None:
    """Replayed layers 0..layer never run, so their cache entries stop growing while the mask and the
    positions are sized from layer 0's: point them at the first upper layer's entry (which they never read)."""
    above = cache.layers[layer + 1]
    for entry in cache.layers[:layer + 1]:
        entry.keys, entry.values, entry.is_initialized = above.keys, above.values, True


def step_loss(coeff: torch.Tensor, logp: torch.Tensor, deltas: list[torch.Tensor], h_norms: list[torch.Tensor],
              cfg: MemoryConfig, label: int, step: int) -> tuple[torch.Tensor, dict]:
    """One request's δ-loop loss -Σ c_t lp_t + wd · Σ ‖δ_k‖ / ‖h_k‖², checked finite, and its trace row."""
    nll = -(coeff[:len(logp)] * logp).sum()
    decay = sum(cfg.v_weight_decay * d.norm() / h ** 2 for d, h in zip(deltas, h_norms))
    loss = nll + decay
    check_finite(f"window {label}, step {step}", loss=loss)
    return loss, {"window": label, "step": step, "loss": loss.item(), "nll": nll.item(),
                  "weight_decay": decay.item(), "delta_norm": max(d.norm().item() for d in deltas),
                  "h_norm": max(h.item() for h in h_norms)}


@torch.no_grad()
def clamp_(deltas: list[torch.Tensor], h_norms: list[torch.Tensor], cfg: MemoryConfig) -> None:
    """Scale every shift longer than clamp · ‖h_k‖ back to that norm (after each Adam update)."""
    for d, h in zip(deltas, h_norms):
        limit = cfg.clamp_norm_factor * h
        norm = d.norm()
        if norm > limit:
            d.mul_(limit / norm)


def optimise_shifts(lm: ShiftedLM, coeff: torch.Tensor, free: list[int], fixed: dict[int, torch.Tensor],
                    cfg: MemoryConfig, trace: list[dict], label: int) -> dict[int, torch.Tensor]:
    """The δ loop of ALGORITHM §4 over the shifts at the `free` positions, `fixed` ones applied.

    loss: `step_loss`; stop below `early_stop`; at most steps-1 Adam updates; after each update a shift
    longer than clamp·‖h_k‖ is scaled back to that norm (`clamp_`).
    """
    device = lm.em.device
    coeff = coeff.to(device)
    upto = int(coeff.nonzero().max()) + 1           # tokens after the last weighted one need no forward pass
    h_norms = [lm.h([p]).norm() for p in free]
    deltas = [torch.zeros(lm.em.hidden_size, device=device, requires_grad=True) for _ in free]
    opt = torch.optim.Adam(deltas, lr=cfg.v_lr)
    for step in range(cfg.v_num_grad_steps):
        logp = lm.logprobs(free, deltas, fixed, upto)[0]
        loss, row = step_loss(coeff, logp, deltas, h_norms, cfg, label, step)
        trace.append(row)
        if loss.item() < cfg.early_stop or step == cfg.v_num_grad_steps - 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        clamp_(deltas, h_norms, cfg)
    return {p: d.detach() for p, d in zip(free, deltas)}


def optimise_shifts_batched(lms: list[ShiftedLM], coeffs: list[torch.Tensor], free: list[int],
                            fixed: list[dict[int, torch.Tensor]], cfg: MemoryConfig, traces: list[list[dict]],
                            label: int) -> list[torch.Tensor | NumericalError]:
    """`optimise_shifts` of one free shift per request, the requests' forward/backward passes batched
    (`batched_logprobs`). Exactly the per-request loop: each δ_r is its own Adam parameter (a request that
    stops early, or fails, leaves the batch and gets no further update), with its own clamp and trace.
    Returns δ_r, or the NumericalError of a request whose loss turned non-finite."""
    device = lms[0].em.device
    coeffs = [c.to(device) for c in coeffs]
    upto = [int(c.nonzero().max()) + 1 for c in coeffs]
    h_norms = [lm.h([p]).norm() for lm, p in zip(lms, free)]
    deltas = [torch.zeros(lms[0].em.hidden_size, device=device, requires_grad=True) for _ in lms]
    opt = torch.optim.Adam(deltas, lr=cfg.v_lr)
    out: list = [None] * len(lms)
    active = list(range(len(lms)))
    for step in range(cfg.v_num_grad_steps):
        logps = batched_logprobs([lms[r] for r in active], [free[r] for r in active],
                                 torch.stack([deltas[r] for r in active]), [fixed[r] for r in active],
                                 [upto[r] for r in active])
        going = []
        for r, logp in zip(active, logps):
            try:
                loss, row = step_loss(coeffs[r], logp[0], [deltas[r]], [h_norms[r]], cfg, label, step)
            except NumericalError as e:
                out[r] = e
                continue
            traces[r].append(row)
            if loss.item() < cfg.early_stop or step == cfg.v_num_grad_steps - 1:
                out[r] = deltas[r].detach()
            else:
                going.append((r, loss))
        if not going:
            break
        opt.zero_grad(set_to_none=True)             # rows that left the batch keep grad None: Adam skips them
        torch.stack([loss for _, loss in going]).sum().backward()
        opt.step()
        clamp_([deltas[r] for r, _ in going], [h_norms[r] for r, _ in going], cfg)
        active = [r for r, _ in going]
    return out


def chunk_cuts(seq: EditSequence, first: int) -> list[int]:
    """Window starts after window `first`'s hook that split a pass into chunks of ≥ MIN_CHUNK positions."""
    cuts, last = [], seq.hook_positions[first]
    for p in seq.hook_positions[first + 1:]:
        if p - last >= MIN_CHUNK:
            cuts.append(p)
            last = p
    return cuts


def weighted_gradients(lm: ShiftedLM, first: int, free: list[int], deltas: list[torch.Tensor],
                       weights: torch.Tensor, inputs: list[list[torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
    """For each row w of `weights` (coefficients over target tokens), ∇ of Σ_t w_t · NLL_t w.r.t. the
    shifts in inputs[row], with `deltas` at the `free` positions (window `first` on).

    One forward pass in chunks of whole windows (`target_states`), one backward through the LM head per
    chunk (`nll_gradients`), then per row one backward through the layers of the chunks up to its last
    weighted token only.
    """
    chunks = lm.target_states(free, deltas, chunk_cuts(lm.seq, first))
    upstream = [lm.nll_gradients(states, position) for states, position in chunks]
    out = []
    for k, w in enumerate(weights):
        last = lm.first_target + int(w.nonzero().max())             # input position of its last weighted token
        used = [c for c, (_, position) in enumerate(chunks) if position <= last]
        grads = []
        for c in used:
            t0 = chunks[c][1] - lm.first_target
            grads.append(w[t0:t0 + chunks[c][0].shape[1]].to(upstream[c])[None, :, None] * upstream[c])
        out.append(torch.autograd.grad([chunks[c][0] for c in used], inputs[k], grads,
                                       retain_graph=k < len(weights) - 1))
    return out


def figure_gradients(lm: ShiftedLM, i: int, delta: torch.Tensor, shared: bool) -> torch.Tensor:
    """∇δ of each figure's mean NLL at δ on window i's hook (no other shift applied): (N - i, d).

    Shared (fast path): one forward pass for all figures (`weighted_gradients`). Otherwise one
    forward/backward per figure (the straightforward path).
    """
    position = lm.seq.hook_positions[i]
    figures = figure_coefficients(lm.seq, i).to(lm.em.device)
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
    masks = torch.stack([seq.window_mask(0, j).float() for j in range(seq.n_windows)]).to(lm.em.device)
    summed = weighted_gradients(lm, 0, [seq.hook_positions[i] for i in windows], zeros, masks,
                                [zeros[:j + 1] for j in range(seq.n_windows)])       # summed[j][i] = ∇δ_i S_j
    out = []
    for i in windows:
        figures = figure_coefficients(seq, i)
        scale = figures[:, seq.windows[i][0]].to(lm.em.device)       # c_ij on window i's first token
        grads = torch.stack([scale[j - i] * summed[j][i] for j in range(i, seq.n_windows)])
        check_finite(f"window {i}, step 0", affinity_gradient=grads)
        out.append(grads)
    return out


def window_affinity(lm: ShiftedLM, i: int, cfg: MemoryConfig, first: torch.Tensor | None = None) -> torch.Tensor:
    """aff_{i,j} for j = i..N-1 (Eq. 12): T_aff Adam steps on window i's own loss, recording at
    each step the gradients of every nested figure Y_i..Y_j. Earlier shifts are not applied and no
    clamp is done, as in the authors' code. first: the figure gradients at δ = 0 when already known
    (`initial_figure_gradients`)."""
    delta = torch.zeros(lm.em.hidden_size, device=lm.em.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    g_first, g_figs = [], []
    for step in range(cfg.affinity_steps):
        if step == 0 and first is not None:
            grads = first
        else:
            grads = figure_gradients(lm, i, delta, shared=cfg.fast)
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


def window_coefficients(seq: EditSequence, i: int, cfg: MemoryConfig, lambdas: list[list[float]]) -> torch.Tensor:
    """Token coefficients of window i's loss under the configured objective (λ for matryoshka)."""
    return token_coefficients(cfg.objective, seq, i, torch.tensor(lambdas[i]) if lambdas else None)


def _result(lm: ShiftedLM, shifts: dict[int, torch.Tensor], lambdas, affinities, trace, seconds: float,
            affinity_seconds: float) -> MemoryResult:
    positions = lm.seq.hook_positions
    h = lm.h(positions).cpu()
    delta = torch.stack([shifts[p] for p in positions]).cpu()
    return MemoryResult(positions, h, delta, h + delta, lambdas, affinities, trace, seconds, affinity_seconds)


def optimise(em: EditableModel, seq: EditSequence, cfg: MemoryConfig) -> MemoryResult:
    """All target memories of one encoded request."""
    start = time.perf_counter()
    lm = ShiftedLM(em, seq, cfg.layer, fast=cfg.fast)
    trace: list[dict] = []
    lambdas, affinities = [], []
    tick = time.perf_counter()
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
            shifts.update(optimise_shifts(lm, coeff, [p], shifts, cfg, trace, label=i))
    return _result(lm, shifts, lambdas, affinities, trace, time.perf_counter() - start, affinity_seconds)


def can_batch(em: EditableModel, cfg: MemoryConfig) -> bool:
    """Whether `optimise_batch` batches requests: the fast path of a window-by-window objective, layers
    above l_WM, and a KV cache with per-layer entries (transformers ≥ 4.56)."""
    return (cfg.fast and cfg.objective != "parallel_nll" and cfg.layer + 1 < em.n_layers
            and hasattr(DynamicCache(), "layers"))


def optimise_batch(em: EditableModel, seqs: list[EditSequence],
                   cfg: MemoryConfig) -> list[MemoryResult | NumericalError]:
    """`optimise` of several requests, their δ loops batched window by window (`optimise_shifts_batched`):
    window i of every request that has one is optimised in the same forward/backward passes. The affinity
    λ of a window depends on no other shift (Eq. 12), so each request's λ are computed first, alone.
    A request whose loss turns non-finite gets its NumericalError; the others go on. Where batching does
    not apply (`can_batch`), or for a single request, they run one by one (`optimise`). seconds: the
    batch's wall time split evenly.
    """
    if len(seqs) == 1 or not can_batch(em, cfg):
        out = []
        for seq in seqs:
            try:
                out.append(optimise(em, seq, cfg))
            except NumericalError as e:
                out.append(e)
        return out
    start = time.perf_counter()
    lms = [ShiftedLM(em, seq, cfg.layer) for seq in seqs]
    failed: list[NumericalError | None] = [None] * len(seqs)
    lambdas: list[list] = [[] for _ in seqs]
    affinities: list[list] = [[] for _ in seqs]
    affinity_seconds = [0.0] * len(seqs)
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
        got = optimise_shifts_batched([lms[r] for r in rows], coeffs, [seqs[r].hook_positions[i] for r in rows],
                                      [dict(shifts[r]) for r in rows], cfg, [traces[r] for r in rows], label=i)
        for r, delta in zip(rows, got):
            if isinstance(delta, NumericalError):
                failed[r] = delta
            else:
                shifts[r][seqs[r].hook_positions[i]] = delta
    seconds = (time.perf_counter() - start) / len(seqs)
    return [failed[r] or _result(lm, shifts[r], lambdas[r], affinities[r], traces[r], seconds, affinity_seconds[r])
            for r, lm in enumerate(lms)]


def encode_request(em: EditableModel, question: str, answer: str, cfg: MemoryConfig) -> EditSequence:
    """A request encoded for this model and objective (one_for_all: a single window)."""
    window = None if cfg.objective == "one_for_all" else cfg.window
    return encode(em.tokenizer, question, answer, em.end_of_turn, window, cfg.system_prompt, cfg.chat_template)


def optimise_request(em: EditableModel, question: str, answer: str, cfg: MemoryConfig) -> tuple[EditSequence, MemoryResult]:
    """Encode a request for this model and objective, then optimise its memories."""
    seq = encode_request(em, question, answer, cfg)
    return seq, optimise(em, seq, cfg)



@torch.no_grad()
def decode_with_shifts(em: EditableModel, seq: EditSequence, layer: int, result: MemoryResult,
                       max_new_tokens: int | None = None) -> list[int]:
    """Greedy continuation of the prompt with the memory shifts hooked in at their absolute positions
    (no weight update): the direct check that the target memories carry the answer.

    Incremental decoding with a KV cache; each forward pass covers positions [start, end) and gets
    the shifts that fall inside it.
    """
    max_new_tokens = max_new_tokens or len(seq.target_ids)
    eos = em.tokenizer.convert_tokens_to_ids(em.end_of_turn)
    ids = torch.tensor([seq.prompt_ids], device=em.device)
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
