"""Target memories z of many requests, in δ batches (docs/ALGORITHM.md §4): the batching that `muke edit`,
muke.update.edit and the optimize_memories stage share. It imports no backend, so that the δ stage's code
identity (muke.workflow.identity) does not move when a weight update changes."""

from __future__ import annotations

from collections.abc import Sequence

from muke.engine.batch_size import DEFAULT_BUDGET_GIB, delta_batch_size
from muke.engine.memory import MemoryConfig, MemoryResult, encode_request, optimise_batch
from muke.engine.windows import EditSequence
from muke.model import EditableModel
from muke.numerics import NumericalError, check_finite


def batches_of(items: Sequence, size: int) -> list[list]:
    """Consecutive batches of `size` items (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def budget_params(hparams: dict) -> dict:
    """What the memories job records beside its batch: with delta_batch_size "auto" (the default) the
    memory budget that sizes its δ batches, hparams.delta_memory_gib (DEFAULT_BUDGET_GIB if unset)."""
    if hparams.get("delta_batch_size", "auto") != "auto":
        return {}
    return {"delta_memory_gib": float(hparams.get("delta_memory_gib", DEFAULT_BUDGET_GIB))}


def delta_batch(
    em: EditableModel, requests: Sequence, cfg: MemoryConfig, batch: int | str, budget_gib: float = DEFAULT_BUDGET_GIB
) -> int:
    """Requests per δ batch: `batch`, or for "auto" as many as a `budget_gib` GiB budget holds
    (batch_size.delta_batch_size over every request; never the memory free at the moment)."""
    if batch != "auto":
        return int(batch)
    seqs = [encode_request(em, r.question, r.answer, cfg) for r in requests]
    return delta_batch_size(em, seqs, cfg.layer, cfg.autocast is not None, budget_gib)


def optimise_group(
    em: EditableModel, requests: Sequence, cfg: MemoryConfig
) -> list[tuple[EditSequence, MemoryResult | NumericalError]]:
    """(EditSequence, result) of each request of one δ batch, their δ loops sharing each step's passes
    (memory.optimise_batch); a request whose loss or z is not finite gets its NumericalError as result."""
    seqs = [encode_request(em, r.question, r.answer, cfg) for r in requests]
    out = []
    for request, seq, result in zip(requests, seqs, optimise_batch(em, seqs, cfg)):
        if not isinstance(result, NumericalError):
            try:
                check_finite(f"request {request.id}", target_memories_z=result.z)
            except NumericalError as e:
                result = e
        out.append((seq, result))
    return out


def optimise_memories(
    em: EditableModel,
    requests: Sequence,
    cfg: MemoryConfig,
    batch: int | str = "auto",
    budget_gib: float = DEFAULT_BUDGET_GIB,
) -> list[tuple[EditSequence, MemoryResult]]:
    """Target memories of EditRequests, `batch` requests per δ batch (`delta_batch`). A request whose loss
    or z turns non-finite raises its NumericalError."""
    out = []
    for group in batches_of(requests, delta_batch(em, requests, cfg, batch, budget_gib)):
        for seq, result in optimise_group(em, group, cfg):
            if isinstance(result, NumericalError):
                raise result
            out.append((seq, result))
    return out
