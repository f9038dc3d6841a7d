"""Sequential (lifelong) editing: batch t is edited into the model as batches < t left it.

Each batch's target memories z are optimised on the edited model, its keys are read on the edited
weights, and its weight update ΔW_t is added before batch t + 1 starts. MEMIT is applied as is; AlphaEdit
also preserves the keys of the earlier edits (projected out of its null space, muke.update.alphaedit);
UnKE fine-tunes the block as edited so far; ft and lora (no target memories) train on the edited model.
The result is the chain ΔW_1 .. ΔW_T: adding it in order (`muke.update.weights.apply(em, chain)`)
reproduces the final model bit for bit, and the original weights come back bit-exactly when the editor
closes. Each link is what a single update is — low-rank factors for the MEMIT family (rank = the batch's
keys), the changed parameters for UnKE, ft and lora — never a dense copy of the model, except a re-solving link.

Four options keep the earlier edits (config editing.*; docs/ALGORITHM.md §5), each off by default:
- preserve_earlier (memit): the edit keys Ks of every earlier batch join the preserved keys Kp of the later
  solves (A = (w·C + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks, muke.update.memit), so a later update moves their outputs less.
  AlphaEdit always preserves them (projected out of its null space); the backends without keys cannot.
- weight_growth g (memit): batch t solves with w·(1 + g·n_t) and w_t·(1 + g·n_t) (mom2_update_weight,
  template_weight), n_t the edits made before it.
- resolve_every k (memit, alphaedit): every k-th batch re-solves the sequence: one update over the target
  memories z of every batch so far, computed on the original weights W_0 (unscaled w; AlphaEdit without the
  earlier keys); its link is W_0 + ΔW − W_current, a dense fp32 difference per down-projection
  (WeightUpdate.params, info["resolved"]). The editor then keeps every batch's targets on the CPU.
- recheck_earlier (memit, alphaedit; edit_passes ≥ 2 and the stop rule): each batch's edit passes also check
  every earlier request on the model as it is, teacher-forced (muke.update.edit.window_check: one forward pass,
  no δ loop), and complete those a later edit pushed below the stop probability (their δ loops and z join the
  pass's update) — a re-solve's repair at the cost of the δ loops of the requests that need it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from muke.engine.memory import MemoryConfig, MemoryResult, encode_request
from muke.model import EditableModel
from muke.update.backends import BACKENDS
from muke.update.edit import compute_update, edit_resolved
from muke.update.keys import Target
from muke.update.memit import MOM2_UPDATE_WEIGHT
from muke.update.memories import batches_of as batches_of  # re-exported: the batches of a sequence
from muke.update.memories import optimise_memories
from muke.update.methods import resolve_method
from muke.update.stats import Stats
from muke.update.weights import WeightUpdate, add

# with their defaults
SEQUENCE_OPTIONS = {"preserve_earlier": False, "weight_growth": 0.0, "resolve_every": None, "recheck_earlier": False}


def check_options(
    backend: str,
    preserve_earlier: bool = False,
    weight_growth: float = 0.0,
    resolve_every: int | None = None,
    recheck_earlier: bool = False,
    edit_passes: int = 1,
    stop_prob: float | None = 0.5,
) -> None:
    """Refuse a sequence option the backend cannot honour (ValueError "option: why"): preserve_earlier,
    resolve_every and recheck_earlier need edit keys and target memories (the MEMIT family: memit, alphaedit),
    weight_growth MEMIT's preservation weight mom2_update_weight, recheck_earlier edit passes (`edit_passes`
    ≥ 2) and the δ loop's stop rule (`stop_prob`, v_stop_prob) that says which earlier edit falls short."""
    b = BACKENDS[backend]
    keyed = b.factored and b.memories  # ΔW maps edit keys to target memories
    if preserve_earlier and not keyed:
        raise ValueError(
            f"preserve_earlier: backend {backend!r} has no edit keys to preserve (memit only; alphaedit always "
            "preserves them)"
        )
    if weight_growth < 0:
        raise ValueError(f"weight_growth: must be ≥ 0, got {weight_growth}")
    if weight_growth and "mom2_update_weight" not in b.options:
        raise ValueError(
            f"weight_growth: backend {backend!r} has no preservation weight mom2_update_weight (memit only)"
        )
    if resolve_every is not None and resolve_every < 1:
        raise ValueError(f"resolve_every: must be ≥ 1 or None, got {resolve_every}")
    if resolve_every is not None and not keyed:
        raise ValueError(
            f"resolve_every: backend {backend!r} has no target memories and keys to re-solve (memit, alphaedit only)"
        )
    if recheck_earlier and not keyed:
        raise ValueError(f"recheck_earlier: backend {backend!r} has no target memories to complete (memit, alphaedit)")
    if recheck_earlier and (edit_passes < 2 or stop_prob is None):
        raise ValueError(
            "recheck_earlier: the earlier edits are re-checked in the edit passes against the δ loop's stop rule; "
            f"it needs edit_passes ≥ 2 (got {edit_passes}) and v_stop_prob (got {stop_prob})"
        )


class SequentialEditor:
    """The model edited batch after batch, inside a `with` block; on exit the weights the method can touch
    are restored bit-exactly. It holds one copy of those weights, the earlier edits' keys (AlphaEdit,
    preserve_earlier) and their targets (resolve_every, recheck_earlier), never the updates themselves (the caller keeps or
    writes them); `n_batches` and `n_edits` count the batches and requests edited.

    resolved: (memory, backend, options) of muke.update.methods.resolve_method, instead of resolving
    `method` with `preset` (the workflow's specs hold them resolved). preserve_earlier, weight_growth,
    resolve_every, recheck_earlier: see the module's docstring (`check_options` refuses what the backend cannot do)."""

    def __init__(
        self,
        em: EditableModel,
        method: str,
        preset: dict | None = None,
        stats: Stats | None = None,
        resolved: tuple[dict, str, dict] | None = None,
        preserve_earlier: bool = False,
        weight_growth: float = 0.0,
        resolve_every: int | None = None,
        recheck_earlier: bool = False,
    ):
        self.em, self.method, self.stats = em, method, stats
        self.memory, self.backend, self.options = resolved or resolve_method(method, preset)
        passes, stop = self.options.get("edit_passes", 1), self.memory.get("v_stop_prob")
        check_options(self.backend, preserve_earlier, weight_growth, resolve_every, recheck_earlier, passes, stop)
        self.layers = self.options["layers"]
        self.weight_growth, self.resolve_every, self.recheck_earlier = weight_growth, resolve_every, recheck_earlier
        self.n_batches = self.n_edits = 0
        keyed = BACKENDS[self.backend].edit_keys or preserve_earlier
        self.edited_keys: dict[int, torch.Tensor] | None = {} if keyed else None
        self.targets: list[Target] | None = [] if resolve_every or recheck_earlier else None
        self.original: dict[str, torch.Tensor] = {}

    def __enter__(self) -> SequentialEditor:
        self.original = {name: p.detach().clone() for name, p in self.changed().items()}
        return self

    def __exit__(self, *exc) -> None:
        self._set(self.original)

    def changed(self) -> dict[str, torch.nn.Parameter]:
        """The parameters the backend changes on the sequence's layers, by name."""
        ids = {id(p) for p in BACKENDS[self.backend].changes(self.em, self.layers)}
        return {name: p for name, p in self.em.model.named_parameters() if id(p) in ids}

    @torch.no_grad()
    def _set(self, values: dict[str, torch.Tensor]) -> None:
        for name, p in self.changed().items():
            p.copy_(values[name])

    def replay(self, update: WeightUpdate, targets: Sequence[Target] | None = None) -> None:
        """Add an update made earlier in this sequence (a resumed run): weights, the earlier edits' keys
        (AlphaEdit, preserve_earlier) and, with resolve_every, its batch's target memories `targets`."""
        if update.backend != self.backend or update.layers != self.layers:
            raise ValueError(
                f"update of {update.request_ids} ({update.backend}, layers {update.layers}) does not belong to a "
                f"{self.method} sequence on layers {self.layers}"
            )
        if self.edited_keys is not None:
            if set(update.keys) != set(self.layers):
                raise ValueError(f"{self.backend} update of {update.request_ids} carries no edit keys to preserve")
            for layer, K in update.keys.items():
                old = self.edited_keys.get(layer)
                self.edited_keys[layer] = K if old is None else torch.cat([old, K], dim=1)
        if self.targets is not None:
            if targets is None or [t.id for t in targets] != update.request_ids:
                raise ValueError(f"resolve_every: the update of {update.request_ids} needs its batch's target memories")
            self.targets += [Target(t.id, t.seq, t.z.cpu()) for t in targets]
        add(self.em, update)
        self.n_batches += 1
        self.n_edits += len(update.request_ids)

    def edit(self, requests: Sequence) -> tuple[WeightUpdate, list[MemoryResult]]:
        """Optimise z and compute ΔW of one batch of EditRequests on the model as edited so far, then add ΔW;
        with resolve_every, every k-th batch's ΔW re-solves the sequence (`resolve`); with recheck_earlier, the
        batch's edit passes re-check the earlier requests."""
        memories = targets = None
        if self.targets is not None:
            memories = optimise_memories(self.em, requests, MemoryConfig(**self.memory))
            targets = [Target(r.id, seq, result.z) for r, (seq, result) in zip(requests, memories)]
        if targets is not None and self.resolve_every and (self.n_batches + 1) % self.resolve_every == 0:
            update, results = self.resolve(targets), [result for _, result in memories]
            update.info["memory_seconds"] = sum(r.seconds for r in results)
        else:
            update, results = edit_resolved(
                self.em,
                requests,
                self.method,
                self.memory,
                self.backend,
                self.batch_options(),
                self.stats,
                memories,
                edited_keys=self.edited_keys,
                earlier=self.targets if self.recheck_earlier else (),
            )
        update.info["sequence_index"] = self.n_batches
        self.replay(update, targets)
        return update, results

    def batch_options(self) -> dict:
        """The backend's options for the next batch: with weight_growth g, MEMIT's preservation weights w
        (mom2_update_weight) and w_t (template_weight) × (1 + g·n), n the edits made so far."""
        if not self.weight_growth:
            return self.options
        growth = 1 + self.weight_growth * self.n_edits
        grown = {"mom2_update_weight": self.options.get("mom2_update_weight", MOM2_UPDATE_WEIGHT) * growth}
        if self.options.get("template_weight"):
            grown["template_weight"] = self.options["template_weight"] * growth
        return {**self.options, **grown}

    def resolve(self, targets: list[Target]) -> WeightUpdate:
        """The link of a batch that re-solves the sequence: ΔW of one update over the targets of every batch so
        far and `targets` (this batch's), computed on the original weights W_0 with the unscaled options (AlphaEdit
        without the earlier keys), stored as W_0 + ΔW − W_current per changed parameter (dense fp32, params), with
        this batch's edit keys (the last columns of the update's). The model is left as it was."""
        changed = self.changed()
        current = {name: p.detach().clone() for name, p in changed.items()}
        try:
            self._set(self.original)
            whole = compute_update(
                self.em,
                self.targets + targets,
                self.backend,
                stats=self.stats,
                method=self.method,
                edited_keys=None if self.edited_keys is None else {},
                memory=self.memory,
                **self.options,
            )
            add(self.em, whole)
            params = {name: p.detach().float() - current[name].float() for name, p in changed.items()}
        finally:
            self._set(current)
        n = sum(len(t.z) for t in targets)  # one key per window
        keys = {layer: K[:, K.shape[1] - n :].clone() for layer, K in whole.keys.items()}
        info = {**whole.info, "resolved": True, "resolved_edits": len(whole.request_ids)}
        return WeightUpdate(self.method, self.backend, self.layers, [t.id for t in targets], {}, params, info, keys)

    def targets_of(self, requests: Sequence, z: Sequence[torch.Tensor]) -> list[Target]:
        """A batch's targets from its target memories z (one (n_windows, d_model) per request), each request
        encoded as the δ loop encodes it (muke.engine.memory.encode_request): what a resumed run replays."""
        cfg = MemoryConfig(**self.memory)
        return [Target(r.id, encode_request(self.em, r.question, r.answer, cfg), zi) for r, zi in zip(requests, z)]


def edit_sequence(
    em: EditableModel,
    batches: Iterable[Sequence],
    method: str,
    preset: dict | None = None,
    stats: Stats | None = None,
    on_batch: Callable[[int, WeightUpdate, list[MemoryResult]], None] | None = None,
    **options,
) -> list[WeightUpdate]:
    """The chain of weight updates of editing `batches` (lists of EditRequests) one after another; options:
    SequentialEditor's preserve_earlier, weight_growth, resolve_every, recheck_earlier.

    on_batch(t, ΔW_t, memory results) runs while the model holds batches 0..t (to evaluate it there);
    the model's original weights are back, bit-exactly, when this returns."""
    chain = []
    with SequentialEditor(em, method, preset, stats, **options) as editor:
        for t, batch in enumerate(batches):
            update, results = editor.edit(batch)
            chain.append(update)
            if on_batch is not None:
                on_batch(t, update, results)
    return chain
