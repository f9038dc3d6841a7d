"""Batch weight updates (ALGORITHM §5): map target memories z to weights, as a revertible ΔW.

Backends, each reading keys on the edit sequence with the CURRENT weights, layer by layer in order:
- memit: for layer index i of L, ΔW = (R / (L - i)) Aᵀ with A = (w·C + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks, on the
  MLP down-projection; R = Z - hidden at l_WM (recomputed per layer). Rank ≤ n keys: stored as factors.
- alphaedit: ΔWᵀ = (P (Ks Ksᵀ + Kp Kpᵀ) + l2·I)⁻¹ P Ks Rᵀ, P the projector on C's null space.
- unke: fine-tune every parameter of the decoder block(s) so the block maps the edit keys to the
  edited outputs and preservation keys to their old outputs.

Every request of a batch contributes its windows' z_i as columns. `WeightUpdate` holds the result;
`apply(em, update)` (muke.update.weights) adds it and restores the original weights bit-exactly on exit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from muke.engine.batch_size import delta_batch_size
from muke.engine.memory import MemoryConfig, MemoryResult, encode_request, optimise_batch
from muke.engine.windows import EditSequence
from muke.model import EditableModel, ModelError
from muke.numerics import NumericalError
from muke.update.alphaedit import alphaedit_update
from muke.update.keys import Target
from muke.update.memit import memit_update
from muke.update.methods import BACKENDS, layer_list, resolve_method
from muke.update.stats import Stats, StatsError, d_ff
from muke.update.unke import unke_update
from muke.update.weights import WeightUpdate


def compute_update(
    em: EditableModel,
    targets: Sequence[Target],
    backend: str,
    layers: list[int],
    keys: str = "sequence",
    stats: Stats | None = None,
    method: str | None = None,
    edited_keys: dict[int, torch.Tensor] | None = None,
    **options,
) -> WeightUpdate:
    """The weight update ΔW of one batch of targets; the model is left unchanged. A factor or parameter
    change that is not finite raises muke.numerics.NumericalError naming the layer.

    edited_keys (AlphaEdit in a sequence, muke.update.sequential): {layer: keys of the earlier edits},
    projected out of the null space; the update then keeps its own keys (update.keys) for the next batches."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    layers = layer_list(layers)
    for layer in layers:
        em.check_layer(layer)
    for t in targets:
        if t.z.shape[-1] != em.hidden_size:
            raise ModelError(
                f"request {t.id!r}: target memories of size {t.z.shape[-1]}, model hidden size {em.hidden_size}"
            )
    start = time.perf_counter()
    info = {"keys": keys, **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}}
    update = WeightUpdate(method or backend, backend, layers, [t.id for t in targets], info=info)
    if backend == "unke":
        update.params, info["trace"] = unke_update(em, targets, layers, keys, **options)
    else:
        if stats is None:
            raise StatsError(f"backend {backend!r} needs second-moment statistics of layers {layers}")
        if stats.meta.get("d_ff") != d_ff(em):
            raise StatsError(
                f"{stats.path}: statistics are for d_ff {stats.meta.get('d_ff')}, the model has {d_ff(em)}"
            )
        if backend == "memit":
            update.factors = memit_update(em, targets, stats, layers, keys, **options)
        else:
            update.factors, read = alphaedit_update(
                em, targets, stats, layers, keys, edited_keys=edited_keys, **options
            )
            update.keys = read if edited_keys is not None else {}
    info["seconds"] = time.perf_counter() - start
    return update


def optimise_memories(
    em: EditableModel, requests, cfg: MemoryConfig, batch: int | str = "auto"
) -> list[tuple[EditSequence, MemoryResult]]:
    """Target memories of EditRequests, `batch` requests sharing each δ step's passes (`optimise_batch`;
    "auto": as many as the device's free memory holds, `batch_size.delta_batch_size`). A request whose loss
    turns non-finite raises its NumericalError."""
    seqs = [encode_request(em, r.question, r.answer, cfg) for r in requests]
    size = delta_batch_size(em, seqs, cfg.layer, cfg.autocast is not None) if batch == "auto" else int(batch)
    out = []
    for k in range(0, len(seqs), size):
        for seq, result in zip(seqs[k : k + size], optimise_batch(em, seqs[k : k + size], cfg)):
            if isinstance(result, NumericalError):
                raise result
            out.append((seq, result))
    return out


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
) -> tuple[WeightUpdate, list[MemoryResult]]:
    """`edit` with the method resolved (muke.update.methods.resolve_method: δ-loop and backend options)."""
    if memories is None:
        memories = optimise_memories(em, requests, MemoryConfig(**memory))
    targets = [Target(r.id, seq, result.z) for r, (seq, result) in zip(requests, memories)]
    results = [result for _, result in memories]
    update = compute_update(em, targets, backend, stats=stats, method=method, edited_keys=edited_keys, **options)
    update.info["memory_seconds"] = sum(r.seconds for r in results)
    return update, results


@torch.no_grad()
def target_nll(em: EditableModel, seq: EditSequence) -> float:
    """Teacher-forced mean NLL of the target tokens given the prompt (nats per token)."""
    logits = em.model(input_ids=seq.input_ids.to(em.device), use_cache=False).logits[0]
    targets = torch.tensor(seq.target_ids, device=em.device)
    return F.cross_entropy(logits[seq.target_positions.to(em.device)].float(), targets).item()
