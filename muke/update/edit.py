"""Batch weight updates (ALGORITHM §5): map target memories z to weights, as a revertible delta.

Backends, each reading keys on the edit sequence with the CURRENT weights, layer by layer in order:
- memit: for layer index i of L, ΔW = (R / (L - i)) Aᵀ with A = (w·C + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks, on the
  MLP down-projection; R = Z - hidden at l_WM (recomputed per layer). Rank ≤ n keys: stored as factors.
- alphaedit: ΔWᵀ = (P (Ks Ksᵀ + Kp Kpᵀ) + l2·I)⁻¹ P Ks Rᵀ, P the projector on C's null space.
- unke: fine-tune every parameter of the decoder block(s) so the block maps the edit keys to the
  edited outputs and preservation keys to their old outputs.

Every request of a batch contributes its windows' z_i as columns. `WeightUpdate` holds the result;
`apply(em, delta)` adds it and restores the original weights bit-exactly on exit.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from muke.engine import hooks
from muke.data import DEFAULT_PRESERVATION, DataError, jsonl_records
from muke.engine.memory import MemoryConfig, MemoryResult, NumericalError, optimise_request
from muke.model import EditableModel, ModelError
from muke.engine.objectives import OBJECTIVES
from muke.update.stats import Stats, StatsError, d_ff, right_pad, save_safetensors_atomic
from muke.engine.windows import EditSequence

BACKENDS = ("memit", "alphaedit", "unke")
KEYS = ("sequence", "last")
SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# name: (objective, backend, keys). Baselines read one key at the last question token on the question
# alone; the μKE / AnyEdit variants read every window's key on question + answer.
METHODS = {
    "muke-memit": ("matryoshka", "memit", "sequence"),
    "muke-unke": ("matryoshka", "unke", "sequence"),
    "anyedit-memit": ("window", "memit", "sequence"),
    "anyedit-unke": ("window", "unke", "sequence"),
    "memit": ("one_for_all", "memit", "last"),
    "alphaedit": ("one_for_all", "alphaedit", "last"),
    "unke": ("one_for_all", "unke", "last"),
}
# Per-model defaults (the authors' Qwen2.5 column, ALGORITHM §8); a preset overrides any of them.
DEFAULT_PRESET = {
    "layers": [4, 5, 6, 7, 8],   # MEMIT family; l_WM = the last
    "unke_layers": [7],          # UnKE; l_WM = the last
    "window": 20,                # μKE and objective+backend pairs
    "anyedit_window": 50,
}
EARLY_STOP = {"memit": 1e-2, "alphaedit": 1e-2, "unke": 5e-3}
MEMORY_OPTIONS = ("lambda_order", "affinity_steps", "v_lr", "v_num_grad_steps", "v_weight_decay",
                  "clamp_norm_factor", "early_stop", "system_prompt", "chat_template", "fast")
# preset key -> backend keyword
BACKEND_OPTIONS = {
    "memit": {"mom2_update_weight": "mom2_update_weight", "solve_dtype": "solve_dtype"},
    "alphaedit": {"null_space_threshold": "threshold", "alphaedit_l2": "l2", "solve_dtype": "solve_dtype",
                  "null_space_cache": "cache_dir"},
    "unke": {"unke_lr": "lr", "unke_weight_decay": "weight_decay", "unke_steps": "steps",
             "n_preserve": "n_preserve", "preservation": "preservation", "seed": "seed"},
}


# ---------------------------------------------------------------------------- methods

def parse_method(name: str) -> tuple[str, str, str]:
    """(objective, backend, keys) of a named method or of an "objective+backend" pair."""
    if name in METHODS:
        return METHODS[name]
    objective, plus, backend = name.partition("+")
    if plus and objective in OBJECTIVES and backend in BACKENDS:
        return objective, backend, "sequence"
    raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)} or an objective+backend "
                     f"pair (objectives: {', '.join(OBJECTIVES)}; backends: {', '.join(BACKENDS)})")


def _layer_list(value) -> list[int]:
    layers = [value] if isinstance(value, int) else [int(x) for x in value]
    if not layers or layers != sorted(set(layers)):
        raise ValueError(f"layers must be a non-empty increasing list, got {value!r}")
    return layers


def resolve_method(name: str, preset: dict | None = None) -> tuple[dict, str, dict]:
    """(MemoryConfig kwargs, backend, backend kwargs) of a method with per-model `preset` values.

    preset keys: layers, unke_layers (or unke_layer), window, anyedit_window, the MemoryConfig options
    in MEMORY_OPTIONS, and the backend options in BACKEND_OPTIONS; other keys are ignored.
    """
    objective, backend, keys = parse_method(name)
    preset = {**DEFAULT_PRESET, **(preset or {})}
    if "unke_layer" in preset:
        preset["unke_layers"] = preset["unke_layer"]
    layers = _layer_list(preset["unke_layers"] if backend == "unke" else preset["layers"])
    window = preset["anyedit_window"] if name.startswith("anyedit-") else preset["window"]
    memory = {"layer": layers[-1], "objective": objective, "window": window, "early_stop": EARLY_STOP[backend]}
    memory.update({k: preset[k] for k in MEMORY_OPTIONS if k in preset})
    options = {"layers": layers, "keys": keys}
    options.update({kw: preset[k] for k, kw in BACKEND_OPTIONS[backend].items() if k in preset})
    return memory, backend, options


# ---------------------------------------------------------------------------- keys and values

@dataclass(frozen=True)
class Target:
    """One request's target memories: z: (n_windows, d_model), z_i for hook position i of `seq`."""

    id: str
    seq: EditSequence
    z: torch.Tensor


def edit_context(target: Target, keys: str) -> tuple[torch.Tensor, list[int]]:
    """(input_ids (1, T), edit positions) where keys and values are read.

    "sequence": question + answer (EditSequence.input_ids) at every window's hook position;
    "last": the question alone at its last token (plain MEMIT / AlphaEdit / UnKE; one window).
    """
    if keys not in KEYS:
        raise ValueError(f"keys must be one of {KEYS}, got {keys!r}")
    seq, n = target.seq, len(target.z)
    if n != seq.n_windows:
        raise ValueError(f"request {target.id!r}: {n} target memories for {seq.n_windows} windows")
    if keys == "last":
        if n != 1:
            raise ValueError(f"request {target.id!r}: keys='last' needs one window (objective one_for_all), got {n}")
        return torch.tensor([seq.prompt_ids]), [len(seq.prompt_ids) - 1]
    return seq.input_ids, seq.hook_positions


@torch.no_grad()
def read_layer(em: EditableModel, layer: int, wm_layer: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K: (T, d_ff) down_proj inputs of `layer` and H: (T, d_model) output of l_WM, fp32, current weights."""
    out = []
    with hooks.capture(em.down_proj(layer), "input") as k, hooks.stop_after(em.layer(wm_layer), out):
        em.model(input_ids=input_ids.to(em.device), use_cache=False)
    return k[0][0].float(), hooks.hidden_of(out[0])[0].float()


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


# ---------------------------------------------------------------------------- memit / alphaedit

def memit_solve(C: torch.Tensor, Ks: torch.Tensor, Kp: torch.Tensor, mom2_update_weight: float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A = (w·C + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks (MEMIT Eq. 14 with the sequence's preserved keys): (d_ff, n).

    C: (d_ff, d_ff); Ks: (d_ff, n) edit keys; Kp: (d_ff, m) preserved keys (m may be 0).
    """
    C, Ks, Kp = (x.to(dtype) for x in (C, Ks, Kp))
    return torch.linalg.solve(mom2_update_weight * C + Kp @ Kp.T + Ks @ Ks.T, Ks).float()


def null_space_projector(C: torch.Tensor, threshold: float = 2e-2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """P = U0 U0ᵀ, U0 the eigenvectors of C with eigenvalue < threshold (AlphaEdit): (d_ff, d_ff)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(C.to(dtype))
    U0 = eigenvectors[:, eigenvalues < threshold]
    return (U0 @ U0.T).float()


def alphaedit_solve(P: torch.Tensor, Ks: torch.Tensor, Kp: torch.Tensor, l2: float = 10.0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """V = (P (Ks Ksᵀ + Kp Kpᵀ) + l2·I)⁻¹ P Ks: (d_ff, n), so that ΔWᵀ = V Rᵀ (AlphaEdit, authors' solve).

    For keys k0 with P k0 = 0 (the preserved subspace) M⁻ᵀ k0 = k0 / l2, so ΔW k0 = R Ksᵀ P k0 / l2 = 0.
    """
    P, Ks, Kp = (x.to(dtype) for x in (P, Ks, Kp))
    M = P @ (Ks @ Ks.T + Kp @ Kp.T) + l2 * torch.eye(len(P), dtype=dtype, device=P.device)
    return torch.linalg.solve(M, P @ Ks).float()


def _cached(stats: Stats, key, make):
    if key not in stats.cache:
        stats.cache[key] = make()
    return stats.cache[key]


def second_moment(stats: Stats, layer: int, device) -> torch.Tensor:
    """C of `layer` on `device`, kept on the Stats object after the first use."""
    return _cached(stats, ("C", layer, str(device)), lambda: stats.second_moment(layer, device))


def projector(stats: Stats, layer: int, device, threshold: float, dtype: torch.dtype,
              cache_dir: str | Path | None = None) -> torch.Tensor:
    """AlphaEdit's P for `layer`, cached in memory and, with cache_dir, in a file keyed by the stats file hash."""
    def make():
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"nullspace-{stats.sha256[:20]}-layer{layer}-{threshold:g}.safetensors"
            if path.exists():
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor("P").to(device)
        P = null_space_projector(second_moment(stats, layer, device), threshold, dtype)
        if path is not None:
            save_safetensors_atomic({"P": P}, path, {"stats": str(stats.path), "layer": str(layer),
                                                     "threshold": repr(threshold)})
        return P
    return _cached(stats, ("P", layer, threshold, str(device)), make)


def check_finite(layer: int, **tensors: torch.Tensor) -> None:
    """Raise NumericalError naming the layer and the tensor when a computed update is not finite
    (e.g. statistics holding NaN, or a singular solve)."""
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise NumericalError(f"layer {layer}: the computed update {name} is not finite")


def add_low_rank(em: EditableModel, layer: int, U: torch.Tensor, V: torch.Tensor) -> None:
    """W_l += U Vᵀ on the down-projection, whatever its storage layout. U: (d_model, r), V: (d_ff, r)."""
    W = em.down_proj_weight(layer)
    if (U.shape[0], V.shape[0]) != tuple(W.shape):
        raise ModelError(f"layer {layer}: a delta of shape {(U.shape[0], V.shape[0])} does not fit the "
                         f"down-projection {tuple(W.shape)}: it was made for another model")
    with torch.no_grad():
        W.add_((U.to(W.device, torch.float32) @ V.to(W.device, torch.float32).T).to(W.dtype))


def low_rank_update(em: EditableModel, targets: Sequence[Target], layers: list[int], keys: str,
                    solve) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The MEMIT-family loop of ALGORITHM §5; returns {layer: (U (d_model, n), V (d_ff, n))}.

    For layer index i of L, with the earlier layers' updates applied: K at all positions, Ks = K at the
    edit positions, Kp = K elsewhere (keys "sequence" only), R = Z - H(l_WM) at the edit positions,
    U = R / (L - i), V = solve(layer, Ks, Kp). The model's weights are restored on return.
    """
    wm = layers[-1]
    contexts = [edit_context(t, keys) for t in targets]
    Z = torch.cat([t.z for t in targets]).to(em.device, torch.float32)            # (n, d_model)
    factors = {}
    with preserved(em.down_proj(l).weight for l in layers):
        for i, layer in enumerate(layers):
            Ks, Kp, cur = [], [], []
            for input_ids, positions in contexts:
                K, H = read_layer(em, layer, wm, input_ids)
                others = torch.ones(len(K), dtype=torch.bool, device=K.device)
                others[positions] = False
                Ks.append(K[positions])
                Kp.append(K[others] if keys == "sequence" else K[:0])
                cur.append(H[positions])
            Ks, Kp = torch.cat(Ks).T, torch.cat(Kp).T                                # (d_ff, n), (d_ff, m)
            U = (Z - torch.cat(cur)).T / (len(layers) - i)                          # R / (L - i)
            V = solve(layer, Ks, Kp)
            check_finite(layer, U=U, V=V)
            add_low_rank(em, layer, U, V)
            factors[layer] = (U.cpu(), V.cpu())
    return factors


def memit_update(em: EditableModel, targets: Sequence[Target], stats: Stats, layers: list[int],
                 keys: str = "sequence", mom2_update_weight: float = 15000.0,
                 solve_dtype: str = "float32") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """MEMIT: V = A = (w·C + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks per layer."""
    dtype = SOLVE_DTYPES[solve_dtype]

    def solve(layer, Ks, Kp):
        return memit_solve(second_moment(stats, layer, em.device), Ks, Kp, mom2_update_weight, dtype)
    return low_rank_update(em, targets, layers, keys, solve)


def alphaedit_update(em: EditableModel, targets: Sequence[Target], stats: Stats, layers: list[int],
                     keys: str = "sequence", threshold: float = 2e-2, l2: float = 10.0,
                     solve_dtype: str = "float32", cache_dir: str | Path | None = None):
    """AlphaEdit: V = (P (Ks Ksᵀ + Kp Kpᵀ) + l2·I)⁻¹ P Ks per layer, P cached per layer."""
    dtype = SOLVE_DTYPES[solve_dtype]

    def solve(layer, Ks, Kp):
        P = projector(stats, layer, em.device, threshold, dtype, cache_dir)
        return alphaedit_solve(P, Ks, Kp, l2, dtype)
    return low_rank_update(em, targets, layers, keys, solve)


# ---------------------------------------------------------------------------- unke

def load_preservation(path: str | Path) -> list[dict]:
    """Alpaca-style records {instruction, input, output} of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "preservation file not found")
    records = jsonl_records(path, ("instruction", "output"))
    if not records:
        raise DataError(path, "no preservation records")
    return records


def preservation_texts(tokenizer, records: list[dict], n: int, rng: random.Random) -> list[str]:
    """n random records as chat-templated user/assistant exchanges (plain text without a template)."""
    texts = []
    for rec in rng.sample(records, min(n, len(records))):
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            texts.append(f"{user}\n{rec['output']}")
    return texts


@dataclass
class BlockCall:
    """One recorded call of a decoder block: its arguments (fp32) and its output hidden states (B, T, d)."""

    args: tuple
    kwargs: dict
    output: torch.Tensor

    def run(self, block: nn.Module) -> torch.Tensor:
        return hooks.hidden_of(block(*self.args, **self.kwargs))


def _to_float(obj):
    """Floating tensors inside nested tuples/lists/dicts cast to fp32 (masks and ids keep their dtype)."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_float(v) for k, v in obj.items()}
    return obj


@torch.no_grad()
def record_block(em: EditableModel, layer: int, wm_layer: int, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> tuple[BlockCall, torch.Tensor]:
    """The call of decoder block `layer` in a forward pass (so it can be rerun standalone with the same
    masks and position embeddings, for any architecture) and H: (B, T, d_model) output of l_WM."""
    calls, out = [], []

    def pre(_module, args, kwargs):
        calls.append((args, kwargs))

    handle = em.layer(layer).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with hooks.capture(em.layer(layer), "output") as block_out, hooks.stop_after(em.layer(wm_layer), out):
            em.model(input_ids=input_ids.to(em.device), use_cache=False,
                     attention_mask=None if attention_mask is None else attention_mask.to(em.device))
    finally:
        handle.remove()
    args, kwargs = calls[0]
    call = BlockCall(_to_float(args), _to_float(kwargs), block_out[0].float())
    return call, hooks.hidden_of(out[0]).float()


def _mse(calls: list[BlockCall], outputs: list[torch.Tensor], block: nn.Module, mask=None) -> torch.Tensor:
    """Mean squared error of block(call) against `outputs` over all (unmasked) positions and features."""
    errors = []
    for call, target in zip(calls, outputs):
        err = call.run(block) - target
        errors.append((err[mask.bool()] if mask is not None else err).flatten())
    return torch.cat(errors).pow(2).mean()


def fit_block(block: nn.Module, edits: list[BlockCall], edit_outputs: list[torch.Tensor], preserve: BlockCall,
              preserve_mask: torch.Tensor, lr: float, weight_decay: float, steps: int,
              trace: list[dict], label: int) -> nn.Module:
    """UnKE's block fine-tuning on a fp32 copy of `block`: AdamW (weight decay 0 on the norm weights),
    full batch, loss = MSE(block(edit keys), edited outputs) + MSE(block(preservation keys), old outputs)."""
    block = copy.deepcopy(block).float().eval().requires_grad_(True)
    norms = {id(p) for m in block.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)}
    groups = [{"params": [p for p in block.parameters() if id(p) not in norms], "weight_decay": weight_decay},
              {"params": [p for p in block.parameters() if id(p) in norms], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, eps=1e-8)
    mask = preserve_mask.to(preserve.output.device)
    for step in range(steps + 1):
        with torch.set_grad_enabled(step < steps):
            edit = _mse(edits, edit_outputs, block)
            keep = _mse([preserve], [preserve.output], block, mask)
            loss = edit + keep
        trace.append({"layer": label, "step": step, "loss": loss.item(), "edit": edit.item(), "preserve": keep.item()})
        if step == steps:
            break                                   # the last entry is the loss after the final update
        opt.zero_grad()
        loss.backward()
        opt.step()
    return block.requires_grad_(False)


def block_prefix(em: EditableModel, layer: int) -> str:
    return f"{em.adapter.layers}.{layer}."


def unke_update(em: EditableModel, targets: Sequence[Target], layers: list[int], keys: str = "sequence",
                lr: float = 2e-4, weight_decay: float = 0.01, steps: int = 50, n_preserve: int = 20,
                preservation: str | Path = DEFAULT_PRESERVATION, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """UnKE: per layer index i of L, block outputs on the edit keys + (z - H(l_WM)) / (L - i) at the edit
    positions become the block's new targets; returns ({parameter name: new - old, fp32}, loss trace).

    Preservation: n_preserve records drawn with a generator seeded by (seed, request ids), so a batch
    gets the same samples whatever else runs.
    """
    wm = layers[-1]
    contexts = [edit_context(t, keys) for t in targets]
    rng = random.Random(f"{seed}|" + "|".join(t.id for t in targets))
    texts = preservation_texts(em.tokenizer, load_preservation(preservation), n_preserve, rng)
    tok = em.tokenizer
    encoded = [tok(t, add_special_tokens=False, truncation=True, max_length=512)["input_ids"] for t in texts]
    pres_ids, pres_mask = right_pad(encoded, tok.pad_token_id if tok.pad_token_id is not None else 0)

    diffs, trace = {}, []
    with preserved(p for layer in layers for p in em.layer(layer).parameters()):
        for i, layer in enumerate(layers):
            edits, edit_outputs = [], []
            for t, (input_ids, positions) in zip(targets, contexts):
                call, H = record_block(em, layer, wm, input_ids)
                out = call.output.clone()
                z = t.z.to(out.device, torch.float32)
                out[0, positions] += (z - H[0, positions]) / (len(layers) - i)
                edits.append(call)
                edit_outputs.append(out)
            preserve, _ = record_block(em, layer, layer, pres_ids, pres_mask)
            block = fit_block(em.layer(layer), edits, edit_outputs, preserve, pres_mask, lr, weight_decay,
                              steps, trace, layer)
            new = dict(block.named_parameters())
            check_finite(layer, **{f"{block_prefix(em, layer)}{name}": p for name, p in new.items()})
            with torch.no_grad():
                for name, p in em.layer(layer).named_parameters():
                    diffs[block_prefix(em, layer) + name] = (new[name] - p.float()).cpu()
                    p.copy_(new[name].to(p.dtype))
    return diffs, trace


# ---------------------------------------------------------------------------- the delta

@dataclass
class WeightUpdate:
    """The weight change of one edit batch.

    factors[l] = (U (d_model, r), V (d_ff, r)): ΔW_l = U Vᵀ on layer l's down-projection (MEMIT family);
    params[name] = new - old value of a parameter, fp32 (UnKE: every parameter of the edited blocks).
    """

    method: str
    backend: str
    layers: list[int]
    request_ids: list[str]
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def dense(self, layer: int) -> torch.Tensor:
        """ΔW of a factored layer: (d_model, d_ff)."""
        U, V = self.factors[layer]
        return U @ V.T

    def save(self, path: str | Path) -> Path:
        """One safetensors file: layer{l}.U / layer{l}.V, param.{name}, and the JSON metadata "muke"."""
        tensors = {}
        for layer, (U, V) in self.factors.items():
            tensors[f"layer{layer}.U"], tensors[f"layer{layer}.V"] = U, V
        tensors.update({f"param.{name}": d for name, d in self.params.items()})
        meta = {"format": "muke.delta/1", "method": self.method, "backend": self.backend, "layers": self.layers,
                "request_ids": self.request_ids, "info": self.info}
        save_safetensors_atomic(tensors, path, {"muke": json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> WeightUpdate:
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "delta file not found")
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("muke")
            if meta is None:
                raise DataError(path, "not a muke weight delta (no 'muke' metadata)")
            meta = json.loads(meta)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        factors = {layer: (tensors[f"layer{layer}.U"], tensors[f"layer{layer}.V"]) for layer in meta["layers"]
                   if f"layer{layer}.U" in tensors}
        params = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
        return cls(meta["method"], meta["backend"], meta["layers"], meta["request_ids"], factors, params, meta["info"])


def _parameter(em: EditableModel, name: str) -> nn.Parameter:
    try:
        return em.model.get_parameter(name)
    except AttributeError:
        raise ModelError(f"the delta changes parameter {name!r}, which this model does not have") from None


def touched(em: EditableModel, delta: WeightUpdate) -> list[torch.Tensor]:
    """The parameters a delta changes."""
    return [em.down_proj(l).weight for l in delta.factors] + [_parameter(em, n) for n in delta.params]


@torch.no_grad()
def add(em: EditableModel, delta: WeightUpdate) -> None:
    """Add a delta to the model's weights in place (no way back: use `apply` to revert)."""
    for layer, (U, V) in delta.factors.items():
        add_low_rank(em, layer, U, V)
    for name, diff in delta.params.items():
        p = _parameter(em, name)
        if p.shape != diff.shape:
            raise ModelError(f"parameter {name!r}: delta of shape {tuple(diff.shape)} for {tuple(p.shape)}")
        p.copy_((p.float() + diff.to(p.device)).to(p.dtype))


@contextmanager
def apply(em: EditableModel, deltas: WeightUpdate | Sequence[WeightUpdate]) -> Iterator[EditableModel]:
    """Edited weights inside the block; on exit every touched parameter is restored bit-exactly."""
    deltas = [deltas] if isinstance(deltas, WeightUpdate) else list(deltas)
    with preserved(p for d in deltas for p in touched(em, d)):
        for d in deltas:
            add(em, d)
        yield em


def export_edited(em: EditableModel, deltas: WeightUpdate | Sequence[WeightUpdate], out_dir: str | Path) -> Path:
    """Write the edited model (save_pretrained + tokenizer) to out_dir, loadable by plain transformers.

    Only down-projections / edited blocks change; tied embeddings stay tied. The folder appears
    complete or not at all (written beside it, then renamed).
    """
    deltas = [deltas] if isinstance(deltas, WeightUpdate) else list(deltas)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with apply(em, deltas):
        em.model.save_pretrained(tmp, safe_serialization=True)
    em.tokenizer.save_pretrained(tmp)
    record = {"source_model": str(em.model.config._name_or_path),
              "edits": [{"method": d.method, "backend": d.backend, "layers": d.layers,
                         "request_ids": d.request_ids} for d in deltas]}
    (tmp / "muke_edit.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


# ---------------------------------------------------------------------------- entry points

def compute_update(em: EditableModel, targets: Sequence[Target], backend: str, layers: list[int],
                  keys: str = "sequence", stats: Stats | None = None, method: str | None = None,
                  **options) -> WeightUpdate:
    """The weight delta of one batch of targets; the model is left unchanged. A factor or parameter
    change that is not finite raises muke.engine.memory.NumericalError naming the layer."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    layers = _layer_list(layers)
    for layer in layers:
        em.check_layer(layer)
    for t in targets:
        if t.z.shape[-1] != em.hidden_size:
            raise ModelError(f"request {t.id!r}: target memories of size {t.z.shape[-1]}, model hidden size {em.hidden_size}")
    start = time.perf_counter()
    info = {"keys": keys, **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}}
    delta = WeightUpdate(method or backend, backend, layers, [t.id for t in targets], info=info)
    if backend == "unke":
        delta.params, info["trace"] = unke_update(em, targets, layers, keys, **options)
    else:
        if stats is None:
            raise StatsError(f"backend {backend!r} needs second-moment statistics of layers {layers}")
        if stats.meta.get("d_ff") != d_ff(em):
            raise StatsError(f"{stats.path}: statistics are for d_ff {stats.meta.get('d_ff')}, the model has {d_ff(em)}")
        update = memit_update if backend == "memit" else alphaedit_update
        delta.factors = update(em, targets, stats, layers, keys, **options)
    info["seconds"] = time.perf_counter() - start
    return delta


def edit(em: EditableModel, requests, method: str, preset: dict | None = None,
         stats: Stats | None = None) -> tuple[WeightUpdate, list[MemoryResult]]:
    """Optimise the target memories of a batch of EditRequests, then compute its weight delta."""
    memory, backend, options = resolve_method(method, preset)
    cfg = MemoryConfig(**memory)
    targets, results = [], []
    for r in requests:
        seq, result = optimise_request(em, r.question, r.answer, cfg)
        targets.append(Target(r.id, seq, result.z))
        results.append(result)
    delta = compute_update(em, targets, backend, stats=stats, method=method, **options)
    delta.info["memory_seconds"] = sum(r.seconds for r in results)
    return delta, results


@torch.no_grad()
def target_nll(em: EditableModel, seq: EditSequence) -> float:
    """Teacher-forced mean NLL of the target tokens given the prompt (nats per token)."""
    logits = em.model(input_ids=seq.input_ids.to(em.device), use_cache=False).logits[0]
    targets = torch.tensor(seq.target_ids, device=em.device)
    return F.cross_entropy(logits[seq.target_positions.to(em.device)].float(), targets).item()
