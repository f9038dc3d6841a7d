"""Batch weight updates (docs/ALGORITHM.md §5): map target memories z to weights, as a revertible ΔW.

Backends (by name: muke.update.backends), each reading keys on the edit sequence with the CURRENT weights,
layer by layer in order:
- memit: for layer index i of L, ΔW = (R / (L - i)) Aᵀ with A = (w·C + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks, on the
  MLP down-projection; R = Z - hidden at l_WM (recomputed per layer). Rank ≤ n keys: stored as factors.
- alphaedit: ΔWᵀ = (P (Ks Ksᵀ + Kp Kpᵀ) + l2·I)⁻¹ P Ks Rᵀ, P the projector on C's null space.
- unke: fine-tune every parameter of the decoder block(s) so the block maps the edit keys to the
  edited outputs and preservation keys to their old outputs.
- ft, lora: no target memories; fine-tune the down-projections (ft) or LoRA adapters (lora) of the layers
  on the requests' target tokens (muke.update.finetune).

Every request of a batch contributes its windows' z_i as columns. `WeightUpdate` holds the result;
`apply(em, update)` (muke.update.weights) adds it and restores the original weights bit-exactly on exit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from muke.engine.memory import MemoryConfig, MemoryResult, encode_request, optimise
from muke.engine.windows import EditSequence
from muke.model import EditableModel, ModelError
from muke.update.backends import BACKENDS
from muke.update.keys import Target
from muke.update.memories import optimise_memories
from muke.update.methods import layer_list, resolve_method
from muke.update.stats import Stats, StatsError, d_ff
from muke.update.weights import WeightUpdate, apply, chain_sum


def compute_update(
    em: EditableModel,
    targets: Sequence[Target],
    backend: str,
    layers: list[int],
    keys: str = "sequence",
    stats: Stats | None = None,
    method: str | None = None,
    edited_keys: dict[int, torch.Tensor] | None = None,
    memory: dict | None = None,
    edit_passes: int = 1,
    earlier: Sequence[Target] = (),
    **options,
) -> WeightUpdate:
    """The weight update ΔW of one batch of targets; the model is left unchanged. A factor or parameter
    change that is not finite raises muke.numerics.NumericalError naming the layer.

    edited_keys (AlphaEdit in a sequence, muke.update.sequential): {layer: keys of the earlier edits},
    projected out of the null space; the update then keeps its own keys (update.keys) for the next batches.
    edit_passes > 1: `further_passes` (iterative editing), their δ loops run with `memory` (MemoryConfig kwargs);
    `earlier`: the targets of earlier edits that the passes re-check (a sequence's recheck_earlier)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {tuple(BACKENDS)}")
    b, layers = BACKENDS[backend], layer_list(layers)
    for layer in layers:
        em.check_layer(layer)
    for t in targets:
        if t.z.shape[-1] != em.hidden_size:
            raise ModelError(
                f"request {t.id!r}: target memories of size {t.z.shape[-1]}, model hidden size {em.hidden_size}"
            )
    if b.stats:
        check_stats(em, stats, backend, layers)
    start = time.perf_counter()
    info = {"keys": keys, **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}}
    update = WeightUpdate(method or backend, backend, layers, [t.id for t in targets], info=info)
    b.fill(em, update, targets, keys, stats, edited_keys, **options)
    info["seconds"] = time.perf_counter() - start
    if edit_passes > 1:
        if memory is None:
            raise ValueError("edit_passes > 1 re-optimises the target memories: it needs the δ loop's options (memory)")
        args = (backend, layers, keys, stats, method, edited_keys)
        update = further_passes(em, targets, update, edit_passes, MemoryConfig(**memory), args, options, earlier)
    return update


def further_passes(
    em: EditableModel,
    targets: Sequence[Target],
    update: WeightUpdate,
    passes: int,
    cfg: MemoryConfig,
    args: tuple,
    options: dict,
    earlier: Sequence[Target] = (),
) -> WeightUpdate:
    """Iterative editing (docs/ALGORITHM.md §5, after Baghel et al. 2025): passes 2..`passes` each run every
    request's δ loop again, from δ = 0, on the model with the update so far applied, and add the update of the
    new z = h' + δ' (h' and the keys read on the edited weights). A window whose tokens the edited model
    already reproduces stops at step 0 (δ' = 0: its z asks the next pass to keep its output); once every window
    of every request does, no further pass runs. Requests run one by one (no δ batch: nothing depends on its
    size). `earlier` (a sequence's recheck_earlier): each pass also checks these requests on the model as it is,
    teacher-forced (`window_check`, no δ loop), and runs the δ loops of those with windows short of the stop
    probability, whose new z join the pass's update (an earlier edit that a later one pushed back is completed).
    Returns the passes' sum (`chain_sum`); info["passes"]: per further pass, the windows whose δ' moved, its δ
    steps, seconds and the earlier requests it re-optimised (`rechecked`); info["seconds"]: pass 1's and every
    further pass's; info["unsettled"]: when the last pass still moved windows (and the stop rule is set),
    {request id: {"short": windows the final model leaves below the stop probability, "off_target": windows where
    its greedy answer leaves the target}} of each request with short windows (`window_check`), `earlier` ones
    included; {} when a pass found nothing to move."""
    done, first = [], update.info["seconds"]
    for _ in range(passes - 1):
        start = time.perf_counter()
        with apply(em, update):
            short = [t for t in earlier if window_check(em, t.seq, cfg.v_stop_prob)[0]]
            found = [optimise(em, t.seq, cfg) for t in [*targets, *short]]
            moved = sum(1 for r in found for w in {row["window"] for row in r.trace if row["step"] > 0})
            row = {"moved_windows": moved, "steps": sum(len(r.trace) for r in found)}
            if earlier:
                row["rechecked"] = [t.id for t in short]
            if moved:
                again = [Target(t.id, t.seq, r.z) for t, r in zip([*targets, *short], found)]
                more = compute_update(em, again, *args, **options)
        done.append({**row, "seconds": time.perf_counter() - start})
        if not moved:
            break
        info, keys, update = update.info, update.keys, chain_sum([update, more])  # its method and layers: pass 1's
        update.request_ids, update.info, update.keys = [t.id for t in targets], info, keys
    update.info["passes"] = done
    update.info["seconds"] = first + sum(row["seconds"] for row in done)
    if not moved:
        update.info["unsettled"] = {}
    elif cfg.v_stop_prob is not None:  # the last pass moved windows: what it left short
        with apply(em, update):
            found = {t.id: window_check(em, t.seq, cfg.v_stop_prob) for t in [*earlier, *targets]}
        update.info["unsettled"] = {rid: {"short": s, "off_target": o} for rid, (s, o) in found.items() if s}
    return update


@torch.no_grad()
def window_check(em: EditableModel, seq: EditSequence, stop_prob: float) -> tuple[list[int], list[int]]:
    """(windows of `seq` with a target token below p = `stop_prob`: those a δ loop would not stop at step 0,
    muke.engine.memory.reproduces without δ; windows with a target token that is not the model's greedy choice:
    where its answer leaves the target), teacher-forced on the model as it is."""
    logits = em.model(input_ids=seq.input_ids.to(em.device), use_cache=False).logits[0]
    logp = logits[seq.target_positions.to(em.device)].float().log_softmax(-1)
    target = torch.tensor(seq.target_ids, device=em.device)
    lp, greedy = logp.gather(-1, target[:, None])[:, 0], logp.argmax(-1) == target
    short = [i for i, (a, b) in enumerate(seq.windows) if lp[a:b].min() < math.log(stop_prob)]
    return short, [i for i, (a, b) in enumerate(seq.windows) if not greedy[a:b].all()]


def check_stats(em: EditableModel, stats: Stats | None, backend: str, layers: list[int]) -> None:
    """The second-moment statistics a backend reads must be there, and be the model's (its d_ff)."""
    if stats is None:
        raise StatsError(f"backend {backend!r} needs second-moment statistics of layers {layers}")
    if stats.meta.get("d_ff") != d_ff(em):
        raise StatsError(f"{stats.path}: statistics are for d_ff {stats.meta.get('d_ff')}, the model has {d_ff(em)}")


def edit(
    em: EditableModel,
    requests,
    method: str,
    preset: dict | None = None,
    stats: Stats | None = None,
    memories: list[tuple[EditSequence, MemoryResult]] | None = None,
    edited_keys: dict[int, torch.Tensor] | None = None,
) -> tuple[WeightUpdate, list[MemoryResult]]:
    """The weight update ΔW of a batch of EditRequests from their target memories: `memories` (one
    (EditSequence, MemoryResult) per request) or, without them, optimised here on the model as it is
    (`optimise_memories`); edited_keys: see compute_update."""
    memory, backend, options = resolve_method(method, preset)
    return edit_resolved(em, requests, method, memory, backend, options, stats, memories, edited_keys)


def edit_resolved(
    em: EditableModel,
    requests,
    method: str,
    memory: dict,
    backend: str,
    options: dict,
    stats: Stats | None = None,
    memories: list[tuple[EditSequence, MemoryResult]] | None = None,
    edited_keys: dict[int, torch.Tensor] | None = None,
    earlier: Sequence[Target] = (),
) -> tuple[WeightUpdate, list[MemoryResult]]:
    """`edit` with the method resolved (muke.update.methods.resolve_method: δ-loop and backend options);
    `earlier`: see compute_update.
    A backend without target memories (ft, lora) trains on the encoded requests (`encoded_targets`):
    no δ loop runs, `memories` are not read and no MemoryResult is returned."""
    if not BACKENDS[backend].memories:
        targets = encoded_targets(em, requests, memory)
        update = compute_update(em, targets, backend, stats=stats, method=method, edited_keys=edited_keys, **options)
        return update, []
    if memories is None:
        memories = optimise_memories(em, requests, MemoryConfig(**memory))
    targets = [Target(r.id, seq, result.z) for r, (seq, result) in zip(requests, memories)]
    results = [result for _, result in memories]
    update = compute_update(
        em,
        targets,
        backend,
        stats=stats,
        method=method,
        edited_keys=edited_keys,
        memory=memory,
        earlier=earlier,
        **options,
    )
    update.info["memory_seconds"] = sum(r.seconds for r in results)
    return update, results


def encoded_targets(em: EditableModel, requests, memory: dict) -> list[Target]:
    """The requests as a backend without target memories reads them: each encoded as the δ loop would
    (chat prompt + target + end-of-turn, muke.engine.memory.encode_request), with no z."""
    cfg = MemoryConfig(**memory)
    empty = torch.empty(0, em.hidden_size)
    return [Target(r.id, encode_request(em, r.question, r.answer, cfg), empty) for r in requests]


@torch.no_grad()
def target_nll(em: EditableModel, seq: EditSequence) -> float:
    """Teacher-forced mean NLL of the target tokens given the prompt (nats per token)."""
    logits = em.model(input_ids=seq.input_ids.to(em.device), use_cache=False).logits[0]
    targets = torch.tensor(seq.target_ids, device=em.device)
    return F.cross_entropy(logits[seq.target_positions.to(em.device)].float(), targets).item()
