"""Keys and values of the batch update (docs/ALGORITHM.md §5): each request's target memories z, the edit
context its keys are read on, and reading down_proj inputs K and the working memory H with the current weights."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from muke.engine import hooks
from muke.engine.windows import EditSequence
from muke.model import EditableModel

KEYS = ("sequence", "last")  # where keys are read: every window of question + answer, or the question's last token


@dataclass(frozen=True)
class Target:
    """One request's target memories: z: (n_windows, d_model), z_i for hook position i of `seq`."""

    id: str
    seq: EditSequence
    z: torch.Tensor


def edit_context(target: Target, keys: str) -> tuple[torch.Tensor, list[int]]:
    """(input_ids (1, T), edit positions) where keys and values are read.

    "sequence": question + answer (EditSequence.input_ids) at every window's hook position;
    "last": the question alone at window 0's hook position, its last token or, with key_position "question",
    the last token of the user's own text (plain MEMIT / AlphaEdit / UnKE; one window).
    """
    if keys not in KEYS:
        raise ValueError(f"keys must be one of {KEYS}, got {keys!r}")
    seq, n = target.seq, len(target.z)
    if n != seq.n_windows:
        raise ValueError(f"request {target.id!r}: {n} target memories for {seq.n_windows} windows")
    if keys == "last":
        if n != 1:
            raise ValueError(f"request {target.id!r}: keys='last' needs one window (objective one_for_all), got {n}")
        return torch.tensor([seq.prompt_ids]), seq.hook_positions[:1]
    return seq.input_ids, seq.hook_positions


@torch.no_grad()
def read_layer(
    em: EditableModel, layer: int, wm_layer: int, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K: (T, d_ff) down_proj inputs of `layer` and H: (T, d_model) output of l_WM, fp32, current weights."""
    out = []
    with hooks.capture(em.down_proj(layer), "input") as k, hooks.stop_after(em.layer(wm_layer), out):
        em.model(input_ids=input_ids.to(em.device), use_cache=False)
    return k[0][0].float(), hooks.hidden_of(out[0])[0].float()


def down_projections(em: EditableModel, layers: Iterable[int]) -> Iterator[torch.Tensor]:
    """The MLP down-projection weights of `layers` (what the MEMIT family changes)."""
    return (em.down_proj(layer).weight for layer in layers)


def blocks(em: EditableModel, layers: Iterable[int]) -> Iterator[torch.Tensor]:
    """Every parameter of the decoder blocks `layers` (what UnKE changes)."""
    return (p for layer in layers for p in em.layer(layer).parameters())


@contextmanager
def preserved(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Restore every parameter bit-exactly (copy_ from a clone) when the block exits."""
    params = list({id(p): p for p in params}.values())
    originals = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
