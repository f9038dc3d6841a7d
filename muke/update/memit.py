"""MEMIT (ALGORITHM §5): for layer index i of L, ΔW = (R / (L - i)) Aᵀ with
A = (w·C + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks on the MLP down-projection, R = Z - H(l_WM) recomputed per layer.
ΔW has rank ≤ n keys and is kept as factors U Vᵀ; `low_rank_update` is the loop AlphaEdit shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from muke.model import EditableModel, ModelError
from muke.numerics import check_finite
from muke.update.keys import Target, edit_context, preserved, read_layer
from muke.update.stats import Stats

SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def memit_solve(
    C: torch.Tensor, Ks: torch.Tensor, Kp: torch.Tensor, mom2_update_weight: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A = (w·C + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks (MEMIT Eq. 14 with the sequence's preserved keys): (d_ff, n).

    C: (d_ff, d_ff); Ks: (d_ff, n) edit keys; Kp: (d_ff, m) preserved keys (m may be 0).
    """
    C, Ks, Kp = (x.to(dtype) for x in (C, Ks, Kp))
    return torch.linalg.solve(mom2_update_weight * C + Kp @ Kp.T + Ks @ Ks.T, Ks).float()


def cached_on(stats: Stats, key, make):
    if key not in stats.cache:
        stats.cache[key] = make()
    return stats.cache[key]


def second_moment(stats: Stats, layer: int, device) -> torch.Tensor:
    """C of `layer` on `device`, kept on the Stats object after the first use."""
    return cached_on(stats, ("C", layer, str(device)), lambda: stats.second_moment(layer, device))


def add_low_rank(em: EditableModel, layer: int, U: torch.Tensor, V: torch.Tensor) -> None:
    """W_l += U Vᵀ on the down-projection, whatever its storage layout. U: (d_model, r), V: (d_ff, r)."""
    W = em.down_proj_weight(layer)
    if (U.shape[0], V.shape[0]) != tuple(W.shape):
        raise ModelError(
            f"layer {layer}: a ΔW of shape {(U.shape[0], V.shape[0])} does not fit the "
            f"down-projection {tuple(W.shape)}: it was made for another model"
        )
    with torch.no_grad():
        W.add_((U.to(W.device, torch.float32) @ V.to(W.device, torch.float32).T).to(W.dtype))


def low_rank_update(
    em: EditableModel, targets: Sequence[Target], layers: list[int], keys: str, solve
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The MEMIT-family loop of ALGORITHM §5; returns {layer: (U (d_model, n), V (d_ff, n))}.

    For layer index i of L, with the earlier layers' updates applied: K at all positions, Ks = K at the
    edit positions, Kp = K elsewhere (keys "sequence" only), R = Z - H(l_WM) at the edit positions,
    U = R / (L - i), V = solve(layer, Ks, Kp). The model's weights are restored on return.
    """
    wm = layers[-1]
    contexts = [edit_context(t, keys) for t in targets]
    Z = torch.cat([t.z for t in targets]).to(em.device, torch.float32)  # (n, d_model)
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
            Ks, Kp = torch.cat(Ks).T, torch.cat(Kp).T  # (d_ff, n), (d_ff, m)
            U = (Z - torch.cat(cur)).T / (len(layers) - i)  # R / (L - i)
            V = solve(layer, Ks, Kp)
            check_finite(f"layer {layer}, computed update", U=U, V=V)
            add_low_rank(em, layer, U, V)
            factors[layer] = (U.cpu(), V.cpu())
    return factors


def memit_update(
    em: EditableModel,
    targets: Sequence[Target],
    stats: Stats,
    layers: list[int],
    keys: str = "sequence",
    mom2_update_weight: float = 15000.0,
    solve_dtype: str = "float32",
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """MEMIT: V = A = (w·C + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks per layer."""
    dtype = SOLVE_DTYPES[solve_dtype]

    def solve(layer, Ks, Kp):
        return memit_solve(second_moment(stats, layer, em.device), Ks, Kp, mom2_update_weight, dtype)

    return low_rank_update(em, targets, layers, keys, solve)
