"""Sequential (lifelong) editing: batch t is edited into the model as batches < t left it.

Each batch's target memories z are optimised on the edited model, its keys are read on the edited
weights, and its weight update ΔW_t is added before batch t + 1 starts. MEMIT is applied as is; AlphaEdit
also preserves the keys of the earlier edits (projected out of its null space, muke.update.alphaedit);
UnKE fine-tunes the block as edited so far; ft and lora (no target memories) train on the edited model.
The result is the chain ΔW_1 .. ΔW_T: adding it in order (`muke.update.weights.apply(em, chain)`)
reproduces the final model bit for bit, and the original weights come back bit-exactly when the editor
closes. Each link is what a single update is — low-rank factors for the MEMIT family (rank = the batch's
keys), the changed parameters for UnKE, ft and lora — never a dense copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack

import torch

from muke.engine.memory import MemoryResult
from muke.model import EditableModel
from muke.update.backends import BACKENDS
from muke.update.edit import edit_resolved
from muke.update.keys import preserved
from muke.update.memories import batches_of as batches_of  # re-exported: the batches of a sequence
from muke.update.methods import resolve_method
from muke.update.stats import Stats
from muke.update.weights import WeightUpdate, add


class SequentialEditor:
    """The model edited batch after batch, inside a `with` block; on exit the weights the method can touch
    are restored bit-exactly. It holds one copy of those weights and, for AlphaEdit, the earlier edits'
    keys, never the updates themselves (the caller keeps or writes them); `n_batches` counts them.

    resolved: (memory, backend, options) of muke.update.methods.resolve_method, instead of resolving
    `method` with `preset` (the workflow's specs hold them resolved)."""

    def __init__(
        self,
        em: EditableModel,
        method: str,
        preset: dict | None = None,
        stats: Stats | None = None,
        resolved: tuple[dict, str, dict] | None = None,
    ):
        self.em, self.method, self.stats = em, method, stats
        self.memory, self.backend, self.options = resolved or resolve_method(method, preset)
        self.layers = self.options["layers"]
        self.n_batches = 0
        self.edited_keys: dict[int, torch.Tensor] | None = {} if BACKENDS[self.backend].edit_keys else None
        self._stack = ExitStack()

    def __enter__(self) -> SequentialEditor:
        self._stack.enter_context(preserved(BACKENDS[self.backend].changes(self.em, self.layers)))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def replay(self, update: WeightUpdate) -> None:
        """Add an update made earlier in this sequence (a resumed run): weights and AlphaEdit's key cache."""
        if update.backend != self.backend or update.layers != self.layers:
            raise ValueError(
                f"update of {update.request_ids} ({update.backend}, layers {update.layers}) does not belong to a "
                f"{self.method} sequence on layers {self.layers}"
            )
        if self.edited_keys is not None:
            if set(update.keys) != set(self.layers):
                raise ValueError(f"AlphaEdit update of {update.request_ids} carries no edit keys to preserve")
            for layer, K in update.keys.items():
                old = self.edited_keys.get(layer)
                self.edited_keys[layer] = K if old is None else torch.cat([old, K], dim=1)
        add(self.em, update)
        self.n_batches += 1

    def edit(self, requests: Sequence) -> tuple[WeightUpdate, list[MemoryResult]]:
        """Optimise z and compute ΔW of one batch of EditRequests on the model as edited so far, then add ΔW."""
        update, results = edit_resolved(
            self.em,
            requests,
            self.method,
            self.memory,
            self.backend,
            self.options,
            self.stats,
            edited_keys=self.edited_keys,
        )
        update.info["sequence_index"] = self.n_batches
        self.replay(update)
        return update, results


def edit_sequence(
    em: EditableModel,
    batches: Iterable[Sequence],
    method: str,
    preset: dict | None = None,
    stats: Stats | None = None,
    on_batch: Callable[[int, WeightUpdate, list[MemoryResult]], None] | None = None,
) -> list[WeightUpdate]:
    """The chain of weight updates of editing `batches` (lists of EditRequests) one after another.

    on_batch(t, ΔW_t, memory results) runs while the model holds batches 0..t (to evaluate it there);
    the model's original weights are back, bit-exactly, when this returns."""
    chain = []
    with SequentialEditor(em, method, preset, stats) as editor:
        for t, batch in enumerate(batches):
            update, results = editor.edit(batch)
            chain.append(update)
            if on_batch is not None:
                on_batch(t, update, results)
    return chain


def chain_sum(updates: Iterable[WeightUpdate]) -> WeightUpdate:
    """One update equal to the chain up to fp32 rounding, read one link at a time: the factors side by side
    per layer (ΔW = Σ U_t V_tᵀ = [U_1 .. U_T][V_1 .. V_T]ᵀ, rank the sum of the links'), the parameter
    differences summed (UnKE: one block's size however long the chain)."""
    total = None
    for u in updates:
        if total is None:
            total = WeightUpdate(u.method, u.backend, list(u.layers), [], info={"links": 0})
        total.request_ids += u.request_ids
        total.info["links"] += 1
        for layer, (U, V) in u.factors.items():
            old = total.factors.get(layer)
            total.factors[layer] = (U, V) if old is None else (torch.cat([old[0], U], 1), torch.cat([old[1], V], 1))
        for name, diff in u.params.items():
            total.params[name] = diff.clone() if name not in total.params else total.params[name] + diff
    if total is None:
        raise ValueError("an empty chain has no sum")
    return total
