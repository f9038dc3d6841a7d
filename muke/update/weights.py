"""The weight update ΔW of one edit batch: low-rank factors (MEMIT family) or parameter differences
(UnKE); apply it and revert it bit-exactly, save and load it, export a fully edited model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from muke.data import DataError
from muke.io import write_safetensors
from muke.model import EditableModel, ModelError
from muke.update.keys import preserved
from muke.update.memit import add_low_rank


@dataclass
class WeightUpdate:
    """The weight change of one edit batch.

    factors[l] = (U (d_model, r), V (d_ff, r)): ΔW_l = U Vᵀ on layer l's down-projection (MEMIT family);
    params[name] = new - old value of a parameter, fp32 (UnKE: every parameter of the edited blocks);
    keys[l] = the edit keys Ks (d_ff, n) of layer l as this update read them (AlphaEdit in a sequence: the
    later batches project them out, muke.update.sequential).
    """

    method: str
    backend: str
    layers: list[int]
    request_ids: list[str]
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)

    def dense(self, layer: int) -> torch.Tensor:
        """ΔW of a factored layer: (d_model, d_ff)."""
        U, V = self.factors[layer]
        return U @ V.T

    def save(self, path: str | Path) -> Path:
        """One safetensors file: layer{l}.U / layer{l}.V (/ layer{l}.K), param.{name}, and the JSON metadata "muke"."""
        tensors = {}
        for layer, (U, V) in self.factors.items():
            tensors[f"layer{layer}.U"], tensors[f"layer{layer}.V"] = U, V
        tensors.update({f"layer{layer}.K": K for layer, K in self.keys.items()})
        tensors.update({f"param.{name}": diff for name, diff in self.params.items()})
        meta = {
            "format": "muke.update/1",
            "method": self.method,
            "backend": self.backend,
            "layers": self.layers,
            "request_ids": self.request_ids,
            "info": self.info,
        }
        write_safetensors(path, tensors, {"muke": json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> WeightUpdate:
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "weight update file not found")
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("muke")
            if meta is None:
                raise DataError(path, "not a muke weight update (no 'muke' metadata)")
            meta = json.loads(meta)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        factors = {
            layer: (tensors[f"layer{layer}.U"], tensors[f"layer{layer}.V"])
            for layer in meta["layers"]
            if f"layer{layer}.U" in tensors
        }
        params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
        keys = {layer: tensors[f"layer{layer}.K"] for layer in meta["layers"] if f"layer{layer}.K" in tensors}
        return cls(
            meta["method"], meta["backend"], meta["layers"], meta["request_ids"], factors, params, meta["info"], keys
        )


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


def _parameter(em: EditableModel, name: str) -> nn.Parameter:
    try:
        return em.model.get_parameter(name)
    except AttributeError:
        raise ModelError(f"the weight update changes parameter {name!r}, which this model does not have") from None


def touched(em: EditableModel, update: WeightUpdate) -> list[torch.Tensor]:
    """The parameters ΔW changes."""
    return [em.down_proj(l).weight for l in update.factors] + [_parameter(em, n) for n in update.params]


@torch.no_grad()
def add(em: EditableModel, update: WeightUpdate) -> None:
    """Add ΔW to the model's weights in place (no way back: use `apply` to revert)."""
    for layer, (U, V) in update.factors.items():
        add_low_rank(em, layer, U, V)
    for name, diff in update.params.items():
        p = _parameter(em, name)
        if p.shape != diff.shape:
            raise ModelError(f"parameter {name!r}: ΔW of shape {tuple(diff.shape)} for {tuple(p.shape)}")
        p.copy_((p.float() + diff.to(p.device)).to(p.dtype))


@contextmanager
def apply(em: EditableModel, updates: WeightUpdate | Sequence[WeightUpdate]) -> Iterator[EditableModel]:
    """Edited weights inside the block; on exit every touched parameter is restored bit-exactly."""
    updates = [updates] if isinstance(updates, WeightUpdate) else list(updates)
    with preserved(p for u in updates for p in touched(em, u)):
        for u in updates:
            add(em, u)
        yield em


def export_edited(em: EditableModel, updates: WeightUpdate | Sequence[WeightUpdate], out_dir: str | Path) -> Path:
    """Write the edited model (save_pretrained + tokenizer) to out_dir, loadable by plain transformers.

    Only down-projections / edited blocks change; tied embeddings stay tied. The folder appears
    complete or not at all (written beside it, then renamed).
    """
    updates = [updates] if isinstance(updates, WeightUpdate) else list(updates)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with apply(em, updates):
        em.model.save_pretrained(tmp, safe_serialization=True)
    em.tokenizer.save_pretrained(tmp)
    record = {
        "source_model": str(em.model.config._name_or_path),
        "edits": [
            {"method": u.method, "backend": u.backend, "layers": u.layers, "request_ids": u.request_ids}
            for u in updates
        ],
    }
    (tmp / "muke_edit.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
