"""AlphaEdit (ALGORITHM §5): ΔWᵀ = (P (Ks Ksᵀ + Kp Kpᵀ) + l2·I)⁻¹ P Ks Rᵀ, with P the projector on the
null space of the preserved keys' second moment C (eigenvalues < threshold), cached per layer."""

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


def projector(
    stats: Stats, layer: int, device, threshold: float, dtype: torch.dtype, cache_dir: str | Path | None = None
) -> torch.Tensor:
    """AlphaEdit's P for `layer` on `device`: computed there once, then kept on the host (and, with cache_dir,
    in a file keyed by the stats file hash) and streamed to the device for each use."""

    def make():
        path = None
        if cache_dir is not None:
            path = Path(cache_dir) / f"nullspace-{stats.sha256[:20]}-layer{layer}-{threshold:g}.safetensors"
            if path.exists():
                with safe_open(str(path), framework="pt") as f:
                    return f.get_tensor("P")
        P = null_space_projector(second_moment(stats, layer, device), threshold, dtype).cpu()
        if path is not None:
            write_safetensors(
                path, {"P": P}, {"stats": str(stats.path), "layer": str(layer), "threshold": repr(threshold)}
            )
        return P

    return cached_on(stats, ("P", layer, threshold), make).to(device)


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
):
    """AlphaEdit: V = (P (Ks Ksᵀ + Kp Kpᵀ) + l2·I)⁻¹ P Ks per layer, P cached per layer."""
    dtype = SOLVE_DTYPES[solve_dtype]

    def solve(layer, Ks, Kp):
        P = projector(stats, layer, em.device, threshold, dtype, cache_dir)
        return alphaedit_solve(P, Ks, Kp, l2, dtype)

    return low_rank_update(em, targets, layers, keys, solve)
