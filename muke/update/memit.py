"""MEMIT (docs/ALGORITHM.md §5): for layer index i of L, ΔW = (R / (L - i)) Aᵀ with
A = (w·C + w_t·C_t + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks on the MLP down-projection, R = Z - H(l_WM) recomputed per layer
(C_t: the template's keys, muke.update.template_keys; w_t = template_weight, 0 by default). ΔW has rank ≤ n keys
and is kept as factors U Vᵀ; `low_rank_update` is the loop AlphaEdit shares. Where a layer normalises its MLP
output before the residual (Gemma 2/3, OLMo 2), R / (L - i) is mapped through that norm (`down_proj_change`). In a
sequence with preserve_earlier (muke.update.sequential) the keys of the earlier edits join
Kp, so that a later update moves their outputs less."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from muke.engine.windows import EditSequence
from muke.model import EditableModel, ModelError
from muke.numerics import check_finite
from muke.update.keys import Target, down_projections, edit_context, preserved, read_layer
from muke.update.stats import Stats
from muke.update.template_keys import TEMPLATE_PROMPTS, attached_template

SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
MOM2_UPDATE_WEIGHT = 15000.0  # w of memit_update where no preset sets mom2_update_weight


def memit_solve(
    C: torch.Tensor,
    Ks: torch.Tensor,
    Kp: torch.Tensor,
    mom2_update_weight: float,
    dtype: torch.dtype = torch.float32,
    C_t: torch.Tensor | None = None,
    template_weight: float = 0.0,
) -> torch.Tensor:
    """A = (w·C + w_t·C_t + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks (MEMIT Eq. 14 with the sequence's preserved keys and, for
    w_t = template_weight > 0, the template's keys, docs/ALGORITHM.md §5): (d_ff, n).

    C, C_t: (d_ff, d_ff); Ks: (d_ff, n) edit keys; Kp: (d_ff, m) preserved keys (m may be 0). One d_ff² matrix
    besides C and the solve's factorisation: M = w·C + K Kᵀ with K = [Kp Ks] in one addmm (+ w_t·C_t in place).
    """
    K = torch.cat([Kp, Ks], 1).to(dtype)  # (d_ff, m + n)
    M = torch.addmm(C.to(dtype), K, K.T, beta=mom2_update_weight)
    if template_weight:
        M.add_(C_t.to(M.device, dtype), alpha=template_weight)
    return torch.linalg.solve(M, Ks.to(dtype)).float()


def cached_on(stats: Stats, key, make):
    if key not in stats.cache:
        stats.cache[key] = make()
    return stats.cache[key]


def second_moment(stats: Stats, layer: int, device) -> torch.Tensor:
    """C of `layer` on `device`, streamed from the host copy for each use and never kept there: the
    device holds one layer's C at a time (d_ff² fp32: 1.4 GB at Qwen2.5-7B's d_ff)."""
    return stats.second_moment(layer, device)


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


def rms_norm_preimage(y: torch.Tensor, gain: torch.Tensor, eps: float, like: torch.Tensor) -> torch.Tensor:
    """x with N(x) = y for the RMSNorm N(x) = gain ⊙ x / sqrt(mean(x²) + eps), row by row, or, where y is out of
    N's reach, the x whose N(x) is nearest y.

    N forgets x's scale: x = c·v with mean(v²) = 1 gives N(x) = a ⊙ v, a = gain · c / sqrt(c² + eps). With c =
    rms(like) (the current output's scale, kept), the point a ⊙ v nearest y is v = a ⊙ y / (a² + μ), μ > -min(a²)
    the root of mean(v²) = 1 (the trust-region secular equation), found by bisection; μ = 0, N(x) = y, wherever
    y is an output of N at that scale (up to eps / c²). y, like: (n, d); gain: (d,); fp64 inside.
    """
    y64 = y.double()
    c = like.double().pow(2).mean(-1, keepdim=True).sqrt()  # (n, 1)
    a = gain.double() * c / (c**2 + eps).sqrt()  # (n, d)
    lo = -(a**2).min(-1, keepdim=True).values  # mean(v²) → ∞ as μ → lo (unless y is 0 there)
    hi = (a * y64).pow(2).mean(-1, keepdim=True).sqrt()  # mean(v²) ≤ 1 at μ = rms(a ⊙ y)
    for _ in range(100):
        mu = (lo + hi) / 2
        outside = (a * y64 / (a**2 + mu)).pow(2).mean(-1, keepdim=True) > 1
        lo, hi = torch.where(outside, mu, lo), torch.where(outside, hi, mu)
    return (c * a * y64 / (a**2 + hi)).to(y.dtype)


@torch.no_grad()
def down_proj_change(em: EditableModel, layer: int, Ks: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The change of layer's down-projection output at the keys Ks (d_ff, n) that moves its residual stream by R
    (d_model, n): R itself where h_out = h_mid + W k; where the layer normalises first, h_out = h_mid + N(W k)
    (`Adapter.post_mlp_norm`), N⁻¹(N(W k) + R) - W k with N⁻¹ = `rms_norm_preimage`."""
    norm = em.post_mlp_norm(layer)
    if norm is None:
        return R
    o = em.down_proj(layer)(Ks.T.to(em.dtype))  # (n, d_model): W k as the model computes it
    y = norm(o).float() + R.T
    gain, eps = em.post_mlp_norm_form(layer)
    return (rms_norm_preimage(y, gain.to(y.device), eps, o.float()) - o.float()).T


def rendered_keys(em: EditableModel, layer: int, wm: int, seq: EditSequence, Ks: torch.Tensor) -> torch.Tensor:
    """A request's edit keys Ks (n_windows, d_ff) with window 0's averaged over the question's renderings
    (MemoryConfig.renderings; each read at its own first hook, on its prompt), as MEMIT averages a key over its
    context templates; Ks itself for a request rendered once."""
    if not seq.renderings:
        return Ks
    first = [Ks[0]] + [
        read_layer(em, layer, wm, torch.tensor([r.prompt_ids]))[0][r.hook_positions[0]] for r in seq.renderings
    ]
    return torch.cat([torch.stack(first).mean(0, keepdim=True), Ks[1:]])


def low_rank_update(
    em: EditableModel, targets: Sequence[Target], layers: list[int], keys: str, solve
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The MEMIT-family loop of docs/ALGORITHM.md §5; returns {layer: (U (d_model, n), V (d_ff, n))}.

    For layer index i of L, with the earlier layers' updates applied: K at all positions, Ks = K at the
    edit positions (window 0's averaged over the question's renderings, `rendered_keys`), Kp = K elsewhere (keys
    "sequence" only), R = Z - H(l_WM) at the edit positions, U = R / (L - i) as a change of the down-projection's
    output (`down_proj_change`), V = solve(layer, Ks, Kp). The model's weights are restored on return.
    """
    wm = layers[-1]
    contexts = [edit_context(t, keys) for t in targets]
    Z = torch.cat([t.z for t in targets]).to(em.device, torch.float32)  # (n, d_model)
    factors = {}
    with preserved(down_projections(em, layers)):
        for i, layer in enumerate(layers):
            Ks, Kp, cur = [], [], []
            for t, (input_ids, positions) in zip(targets, contexts):
                K, H = read_layer(em, layer, wm, input_ids)
                others = torch.ones(len(K), dtype=torch.bool, device=K.device)
                others[positions] = False
                Ks.append(rendered_keys(em, layer, wm, t.seq, K[positions]))
                Kp.append(K[others] if keys == "sequence" else K[:0])
                cur.append(H[positions])
            Ks, Kp = torch.cat(Ks).T, torch.cat(Kp).T  # (d_ff, n), (d_ff, m)
            U = down_proj_change(em, layer, Ks, (Z - torch.cat(cur)).T / (len(layers) - i))  # R / (L - i)
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
    mom2_update_weight: float = MOM2_UPDATE_WEIGHT,
    solve_dtype: str = "float32",
    edited_keys: dict[int, torch.Tensor] | None = None,
    template_weight: float = 0.0,
    template_prompts: int = TEMPLATE_PROMPTS,
    template_span: str = "template",
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[int, torch.Tensor]]:
    """MEMIT: V = A = (w·C + w_t·C_t + Kp Kpᵀ + Ks Ksᵀ)⁻¹ Ks per layer; C_t (template_weight w_t > 0) over
    `template_prompts` chat prompts rendered with the run's chat settings (muke.update.template_keys); with
    `edited_keys` ({layer: (d_ff, m) keys of earlier edits}, a sequence's preserve_earlier) those keys join Kp.
    Returns (factors, {layer: this batch's edit keys Ks (d_ff, n)})."""
    dtype = SOLVE_DTYPES[solve_dtype]
    read = {}
    template = None
    if template_weight:
        template = attached_template(em, stats, layers, template_prompts, system_prompt, chat_template, template_span)

    def solve(layer, Ks, Kp):
        C_t = template.second_moment(layer, em.device) if template else None
        C = second_moment(stats, layer, em.device)
        if edited_keys and layer in edited_keys:
            Kp = torch.cat([Kp, edited_keys[layer].to(Kp.device)], 1)
        read[layer] = Ks.cpu()
        return memit_solve(C, Ks, Kp, mom2_update_weight, dtype, C_t, template_weight)

    return low_rank_update(em, targets, layers, keys, solve), read
