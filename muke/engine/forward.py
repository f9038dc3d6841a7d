"""Forward passes with memory shifts δ at layer l_WM's output: the target log-probs the δ loop needs.

Two implementations of one interface (`ShiftedLM`), chosen by `MemoryConfig.fast` (`shifted_lm`):
`PlainShiftedLM` runs the whole model on the whole sequence at every step; `CachedShiftedLM` gives the
same numbers by running only what a shift can change.

Three coordinate systems, named once here and converted only by the helpers of `ShiftedLM`:
- sequence position p: index into the teacher-forced input (prompt ++ target[:-1]); hook positions are
  sequence positions.
- target index t: index into the target tokens; target t is predicted at sequence position
  `first_target + t`, first_target = len(prompt) - 1 (`position_of`, `target_index`).
- pass offset: a forward pass over sequence positions [start, end) returns row p - start for position p;
  its first `lead(start)` rows predict no target (prompt positions).
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from muke.engine import hooks
from muke.engine.logprob import target_logprobs
from muke.engine.windows import EditSequence
from muke.model import EditableModel, cache_arg

# Written against transformers 4.56 – 5.24 (checked on 5.24.0): a DynamicCache keeps `.layers`, one
# DynamicLayer per decoder layer with `.keys`/`.values` (batch, heads, positions, head_dim) and
# `.is_initialized`. Before 4.56 it kept `key_cache`/`value_cache` lists and has no `.layers`.
LAYERED_CACHE = hasattr(DynamicCache(), "layers")


def sync_skipped_layers(cache: DynamicCache, top: int) -> None:
    """The one place that reaches into DynamicCache internals (versions: `LAYERED_CACHE`).

    Replayed layers 0..top never run, so their cache entries stop growing, while the model sizes the
    positions from layer 0's entry and each kind of attention mask from the first layer of its kind (Gemma 2/3
    mix sliding-window layers, sized by a token count, with full-attention ones, sized by their keys): make
    each skipped entry the first upper entry of its own kind, else the first upper one (it is never read)."""
    above = cache.layers[top + 1 :]
    for i, entry in enumerate(cache.layers[: top + 1]):
        cache.layers[i] = next((e for e in above if type(e) is type(entry)), above[0])


def n_needed(coeff: torch.Tensor) -> int:
    """Targets [0, n) reach the last token with a nonzero coefficient: later ones need no forward pass."""
    return int(coeff.nonzero().max()) + 1


class ShiftedLM:
    """Log-probs of the target tokens of one sequence with memory shifts δ at layer l_WM's output.

    free: sequence positions of the shifts being optimised, deltas: their δ ((d,) each, in the graph);
    fixed: frozen shifts {sequence position: δ}, all before every free one.
    """

    def __init__(self, em: EditableModel, seq: EditSequence, layer: int):
        self.em, self.seq, self.layer = em, seq, layer
        self.input_ids = seq.input_ids.to(em.device)  # (1, T)
        self.targets = torch.tensor(seq.target_ids, device=em.device)  # (n_target,)
        self.first_target = len(seq.prompt_ids) - 1
        seen = []
        with torch.no_grad(), hooks.stop_after(em.layer(layer), seen):
            em.model(input_ids=self.input_ids, use_cache=False)
        self.hidden = hooks.hidden_of(seen[0])  # (1, T, d): unshifted output of layer l_WM
        self._as_tuple = isinstance(seen[0], tuple)

    # ---- coordinate conversions (module docstring)

    def position_of(self, t: int) -> int:
        """Sequence position that predicts target t."""
        return self.first_target + t

    def target_index(self, position: int) -> int:
        """Target index predicted at a sequence position."""
        return position - self.first_target

    def first_predicting(self, start: int) -> int:
        """First sequence position ≥ start that predicts a target."""
        return max(start, self.first_target)

    def lead(self, start: int) -> int:
        """Rows of a pass from `start` before its first target-predicting row."""
        return self.first_predicting(start) - start

    def predicted_targets(self, start: int, end: int) -> torch.Tensor:
        """The targets predicted by sequence positions [start, end), from the first predicting one: (n,)."""
        return self.targets[self.target_index(self.first_predicting(start)) : self.target_index(end)]

    def end(self, upto: int | None) -> int:
        """End of a pass that needs targets [0, upto) only (None: all): positions after the one predicting
        the last of them cannot change earlier log-probs."""
        return self.input_ids.shape[1] if upto is None else self.position_of(upto)

    # ---- shared by both implementations

    def h(self, positions: list[int]) -> torch.Tensor:
        """Unshifted hidden states at the given sequence positions: (n, d), fp32."""
        return self.hidden[0, positions].float()

    def target_logprobs(self, logits: torch.Tensor, first: int) -> torch.Tensor:
        """log p of the targets predicted by `logits` rows, row 0 at sequence position `first`: (B, n)."""
        targets = self.predicted_targets(first, first + logits.shape[1]).expand(logits.shape[0], -1)  # (B, n)
        return target_logprobs(logits, targets)

    def nll_gradients(self, states: torch.Tensor, first: int) -> torch.Tensor:
        """Row k: ∇ of its target's NLL w.r.t. its own row of `states` (no other row changes it), for the
        rows `target_states` returned, row 0 at sequence position `first`: (1, n, d). One backward
        through the LM head for every token."""
        x = states.detach().requires_grad_(True)
        nll = -self.target_logprobs(self.em.head_logits(x), first).sum()
        return torch.autograd.grad(nll, x)[0]

    # ---- the interface

    def logprobs(
        self,
        free: list[int],
        deltas: list[torch.Tensor],
        fixed: dict[int, torch.Tensor] | None = None,
        upto: int | None = None,
    ) -> torch.Tensor:
        """log p(target_t) with the shifts applied: (1, n_target), or (1, ≥ upto) when only targets
        [0, upto) are needed."""
        raise NotImplementedError

    def target_states(
        self, free: list[int], deltas: list[torch.Tensor], cuts: list[int] = ()
    ) -> list[tuple[torch.Tensor, int]]:
        """The LM head's input (the final norm's output), kept in the autograd graph, at the positions that
        predict targets, with `deltas` at the `free` positions: [((1, n, d), sequence position of row 0)],
        one entry per chunk, chunks in order. `cuts`: sequence positions at which the pass may be split, so
        that a backward from a chunk's rows does not run through the later chunks. The head is left out."""
        raise NotImplementedError


class PlainShiftedLM(ShiftedLM):
    """The straightforward implementation: every call runs the whole model on the whole sequence."""

    def _forward(self, free: list[int], deltas: list[torch.Tensor], fixed: dict[int, torch.Tensor], **kwargs):
        with hooks.shifts(self.em.layer(self.layer), list(fixed) + free, list(fixed.values()) + deltas):
            return self.em.model(input_ids=self.input_ids, use_cache=False, **kwargs)

    def logprobs(self, free, deltas, fixed=None, upto=None):
        out = self._forward(free, deltas, fixed or {}, logits_to_keep=len(self.seq.target_ids))
        return self.target_logprobs(out.logits, self.first_target)

    def target_states(self, free, deltas, cuts=()):
        with hooks.capture(self.em.final_norm, "output", detach=False) as seen:
            self._forward(free, deltas, {}, logits_to_keep=1)
        return [(seen[0][:, self.first_target :], self.first_target)]


class CachedShiftedLM(ShiftedLM):
    """The same numbers as `PlainShiftedLM`, running only what a shift can change:
    (1) layers 0..l_WM run once (their output never depends on a shift) and are replayed;
    (2) positions before the first free shift see only frozen inputs, so their keys/values and target
    log-probs are computed once per set of frozen shifts (`prefix`) and reused as a KV-cache prefix:
    each call runs the layers above l_WM on the suffix from the first free shift on.
    """

    def __init__(self, em: EditableModel, seq: EditSequence, layer: int):
        super().__init__(em, seq, layer)
        self._prefix_key, self._prefix = None, None

    @torch.no_grad()
    def prefix(self, start: int, fixed: dict[int, torch.Tensor]):
        """(KV cache, target log-probs (1, n)) of sequence positions [0, start) with the frozen shifts."""
        key = (start, tuple(fixed), tuple(d.data_ptr() for d in fixed.values()))
        if self._prefix_key != key:
            with hooks.shifts(self.em.layer(self.layer), list(fixed), list(fixed.values())):
                out = self.em.model(input_ids=self.input_ids[:, :start], use_cache=True)
            lp = self.target_logprobs(out.logits[:, self.first_target :], self.first_target)
            self._prefix_key, self._prefix = key, (getattr(out, cache_arg(self.em.model)), lp)
        return self._prefix

    def _start(self, free: list[int], fixed: dict[int, torch.Tensor]) -> tuple[int, DynamicCache | None]:
        """The first free shift's position and a copy of the prefix cache before it (None at 0)."""
        start = min(free)
        if any(p >= start for p in fixed):
            raise ValueError("frozen shifts must precede every free shift")
        return start, (copy.deepcopy(self.prefix(start, fixed)[0]) if start > 0 else None)

    def suffix(self, start: int, end: int, free: list[int], deltas: list[torch.Tensor], cache, **kwargs):
        """Sequence positions [start, end) through the layers above l_WM on `cache` (positions [0, start)),
        the free shifts inside the range added at their pass offsets."""
        inside = [k for k, p in enumerate(free) if start <= p < end]
        with (
            hooks.shifts(self.em.layer(self.layer), [free[k] - start for k in inside], [deltas[k] for k in inside]),
            hooks.replay_lower_layers(self.em.layers, self.layer, self.hidden[:, start:end], self._as_tuple),
        ):
            return self.em.model(
                input_ids=self.input_ids[:, start:end],
                use_cache=cache is not None,
                **{cache_arg(self.em.model): cache},
                **kwargs,
            )

    def logprobs(self, free, deltas, fixed=None, upto=None):
        fixed = fixed or {}
        start, cache = self._start(free, fixed)
        logits = self.suffix(start, self.end(upto), free, deltas, cache).logits  # (1, end - start, vocab)
        if self.lead(start):  # no slice when none: no full-size gradient copy
            logits = logits[:, self.lead(start) :]
        lp = self.target_logprobs(logits, self.first_predicting(start))  # (1, n)
        return torch.cat([self.prefix(start, fixed)[1], lp], dim=1) if start > 0 else lp

    def target_states(self, free, deltas, cuts=()):
        start, cache = self._start(free, {})
        chunked = bool(cuts) and start > 0 and self._chunkable
        bounds = [start] + ([c for c in cuts if c > start] if chunked else []) + [self.input_ids.shape[1]]
        chunks = []
        for a, b in zip(bounds, bounds[1:]):  # each chunk on the KV cache of the chunks before it
            if chunked:
                sync_skipped_layers(cache, self.layer)
            with hooks.capture(self.em.final_norm, "output", detach=False) as seen:
                out = self.suffix(a, b, free, deltas, cache, logits_to_keep=1)
            cache = getattr(out, cache_arg(self.em.model))
            chunks.append((seen[0][:, self.lead(a) :], self.first_predicting(a)))  # (1, n, d)
        return chunks

    @property
    def _chunkable(self) -> bool:
        """Whether the KV cache has per-layer entries and there are layers above l_WM."""
        return LAYERED_CACHE and self.layer + 1 < self.em.n_layers


def shifted_lm(em: EditableModel, seq: EditSequence, layer: int, fast: bool = True) -> ShiftedLM:
    """The implementation `MemoryConfig.fast` selects."""
    return (CachedShiftedLM if fast else PlainShiftedLM)(em, seq, layer)
