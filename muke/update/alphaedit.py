"""AlphaEdit (docs/ALGORITHM.md §5): ΔWᵀ = (P (Ks Ksᵀ + Kp Kpᵀ) + l2·I)⁻¹ P Ks Rᵀ, with P the projector on the
null space of the preserved keys' second moment C (eigenvalues < threshold), cached per layer; with
template_weight w_t > 0, of C + w_t·C_t, C_t the chat template's keys (muke.update.template_keys), so that
the template's keys join the preserved subspace.

In a sequence of edits (AlphaEdit §3.3, muke.update.sequential) the keys of the earlier batches are
preserved too: P is narrowed to the part of C's null space orthogonal to them (`without_keys`), so a later
update leaves the earlier edits' outputs unchanged (the paper's cache term P Kp Kpᵀ then vanishes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from muke.io import write_safetensors
from muke.model import EditableModel
from muke.update.keys import Target
from muke.update.memit import SOLVE_DTYPES, cached_on, low_rank_update, second_moment
from muke.update.stats import Stats
from muke.update.template_keys import TEMPLATE_PROMPTS, attached_template


def null_space_projector(C: torch.Tensor, threshold: float = 2e-2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """P = U0 U0ᵀ, U0 the eigenvectors of C with eigenvalue < threshold (AlphaEdit): (d_ff, d_ff)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(C.to(dtype))
    U0 = eigenvectors[:, eigenvalues < threshold]  # a copy: the full eigenvector matrix is freed here
    del eigenvectors
    return (U0 @ U0.T).float()


def alphaedit_solve(
    P: torch.Tensor, Ks: torch.Tensor, Kp: torch.Tensor, l2: float = 10.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """V = (P (Ks Ksᵀ + Kp Kpᵀ) + l2·I)⁻¹ P Ks: (d_ff, n), so that ΔWᵀ = V Rᵀ (AlphaEdit, authors' solve).

    For keys k0 with P k0 = 0 (the preserved subspace) M⁻ᵀ k0 = k0 / l2, so ΔW k0 = R Ksᵀ P k0 / l2 = 0.
    One d_ff² matrix besides P and the solve's factorisation: M = (P K) Kᵀ with K = [Kp Ks], l2 on its diagonal.
    """
    P, Ks = P.to(dtype), Ks.to(dtype)
    K = torch.cat([Kp.to(dtype), Ks], 1)  # (d_ff, m + n)
    M = (P @ K) @ K.T
    M.diagonal().add_(l2)
    return torch.linalg.solve(M, P @ Ks).float()


def without_keys(P: torch.Tensor, K: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """The projector on range(P) ∩ span(K)^⊥: P - B Bᵀ, B an orthonormal basis of range(P K) (fp64 SVD,
    singular values below rtol · the largest dropped). P: (d_ff, d_ff) projector; K: (d_ff, m) keys."""
    if K.shape[1] == 0:
        return P
    B, s, _ = torch.linalg.svd(P.double() @ K.to(P.device, torch.float64), full_matrices=False)
    B = B[:, s > rtol * s.max()] if s.max() > 0 else B[:, :0]
    return (P.double() - B @ B.T).float()


def preserved_moment(
    stats: Stats, layer: int, device, template: Stats | None = None, template_weight: float = 0.0
) -> torch.Tensor:
    """The second moment whose null space AlphaEdit keeps: C, or C + w_t·C_t with the template's keys
    (template_weight w_t > 0, muke.update.template_keys): (d_ff, d_ff) fp32 on `device`."""
    C = second_moment(stats, layer, device)
    if template_weight:
        C.add_(template.second_moment(layer, device), alpha=template_weight)
    return C


def projector(
    stats: Stats,
    layer: int,
    device,
    threshold: float,
    dtype: torch.dtype,
    cache_dir: str | Path | None = None,
    template: Stats | None = None,
    template_weight: float = 0.0,
) -> torch.Tensor:
    """AlphaEdit's P for `layer` on `device` (of `preserved_moment`): computed there once, then kept on the host
    (and, with cache_dir, in a file keyed by the stats file hash, and the template's with its weight) and
    streamed to the device for each use."""
    tag = f"-template{template.sha256[:12]}x{template_weight:g}" if template_weight else ""

    def make():
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"nullspace-{stats.sha256[:20]}{tag}-layer{layer}-{threshold:g}.safetensors"
            if path.exists():
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor("P")
        C = preserved_moment(stats, layer, device, template, template_weight)
        P = null_space_projector(C, threshold, dtype).cpu()
        if path is not None:
            write_safetensors(
                path, {"P": P}, {"stats": str(stats.path), "layer": str(layer), "threshold": repr(threshold)}
            )
        return P

    return cached_on(stats, ("P", layer, threshold, tag), make).to(device)


def alphaedit_update(
    em: EditableModel,
    targets: Sequence[Target],
    stats: Stats,
    layers: list[int],
    keys: str = "sequence",
    threshold: float = 2e-2,
    l2: float = 10.0,
    solve_dtype: str = "float32",
    cache_dir: str | Path | None = None,
    edited_keys: dict[int, torch.Tensor] | None = None,
    template_weight: float = 0.0,
    template_prompts: int = TEMPLATE_PROMPTS,
    template_span: str = "template",
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[int, torch.Tensor]]:
    """AlphaEdit: V = (P (Ks Ksᵀ + Kp Kpᵀ) + l2·I)⁻¹ P Ks per layer, P cached per layer, on the null space of
    C + w_t·C_t (template_weight w_t > 0: the template's keys, as in memit_update); with
    `edited_keys` ({layer: (d_ff, m) keys of earlier edits}) P narrowed to their orthogonal complement.
    Returns (factors, {layer: this batch's edit keys Ks (d_ff, n)})."""
    dtype = SOLVE_DTYPES[solve_dtype]
    read = {}
    template = None
    if template_weight:
        template = attached_template(em, stats, layers, template_prompts, system_prompt, chat_template, template_span)

    def solve(layer, Ks, Kp):
        P = projector(stats, layer, em.device, threshold, dtype, cache_dir, template, template_weight)
        if edited_keys and layer in edited_keys:
            P = without_keys(P, edited_keys[layer])
        read[layer] = Ks.cpu()
        return alphaedit_solve(P, Ks, Kp, l2, dtype)

    return low_rank_update(em, targets, layers, keys, solve), read
