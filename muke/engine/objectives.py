"""Memory-update objectives (docs/ALGORITHM.md §3), in the paper's order:
windows → token coefficients → affinity λ → the Matryoshka loss L_μ.

Every objective of one window i is a coefficient vector c over target tokens, and its loss is
L = -Σ_t c_t · log p(y_t | prompt, y_<t; δ_1..δ_i). Windows are 0-based in code; the paper's
window k is code window k-1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from muke.engine.windows import EditSequence

OBJECTIVES = ("one_for_all", "window", "sequential_nll", "parallel_nll", "matryoshka_vanilla", "matryoshka")
LAMBDA_ORDERS = ("paper", "reference")


def mean_over(mask: torch.Tensor) -> torch.Tensor:
    """Coefficients of the mean NLL over the tokens in `mask`."""
    return mask.float() / mask.sum()


def figure_coefficients(seq: EditSequence, i: int) -> torch.Tensor:
    """Mean-NLL coefficients of the nested target figures Y_i..Y_j, j = i..N-1: (N - i, len(target))."""
    return torch.stack([mean_over(seq.window_mask(i, j)) for j in range(i, seq.n_windows)])


def matryoshka_coefficients(seq: EditSequence, i: int, lambdas: torch.Tensor) -> torch.Tensor:
    """Eq. 10: figure Y_i..Y_j weighs each of its tokens by λ_{i,j}; a token's coefficient is the sum
    over the figures containing it, divided by (N - i) figures and by the tokens from window i on.

    lambdas: (N - i,) for j = i..N-1. With all λ = 1 a token of window k gets (N-k)/(N-i) (0-based),
    the paper's (N-k+1)/(N-i+1).
    """
    n_fig = seq.n_windows - i
    if lambdas.shape != (n_fig,):
        raise ValueError(f"window {i}: expected {n_fig} λ values, got {tuple(lambdas.shape)}")
    coeff = torch.zeros(len(seq.target_ids))
    for j, lam in zip(range(i, seq.n_windows), lambdas.tolist()):
        coeff += lam * seq.window_mask(i, j).float()
    n_tok = seq.window_mask(i, seq.n_windows - 1).sum()
    return coeff / n_fig / n_tok


def token_coefficients(objective: str, seq: EditSequence, i: int, lambdas: torch.Tensor | None = None) -> torch.Tensor:
    """Coefficient vector c of window i's loss for a sequential objective: (len(target),)."""
    if objective in ("one_for_all", "window"):
        return mean_over(seq.window_mask(i))
    if objective == "sequential_nll":
        return mean_over(seq.window_mask(i, seq.n_windows - 1))
    if objective == "matryoshka_vanilla":
        return matryoshka_coefficients(seq, i, torch.ones(seq.n_windows - i))
    if objective == "matryoshka":
        if lambdas is None:
            raise ValueError("the matryoshka objective needs the affinity λ of the window")
        return matryoshka_coefficients(seq, i, lambdas)
    if objective == "parallel_nll":
        return mean_over(torch.ones(len(seq.target_ids), dtype=torch.bool))
    raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")


def affinity(g_first: torch.Tensor, g_figures: torch.Tensor) -> torch.Tensor:
    """Eq. 12: aff_{i,j} = mean over steps t of cos(∇δ L(Y_i), ∇δ L(Y_i..Y_j)).

    g_first: (T, d) gradients of the window-i loss; g_figures: (T, n_fig, d) for figures j = i..N-1.
    Returns (n_fig,); the first figure is window i itself, so its affinity is 1.
    """
    return F.cosine_similarity(g_first[:, None, :], g_figures, dim=-1).mean(0)


def affinity_lambdas(aff: torch.Tensor, order: str = "reference") -> torch.Tensor:
    """λ_{i,j} = 2 - aff_{i,j} (Eq. 12), indexed by figure j = i..N-1.

    order="reference" reproduces the authors' code, which assigns the values in reverse: the figure
    running to the end of the target gets 2 - aff_{i,i} = 1 and window i alone gets 2 - aff_{i,N}.
    """
    if order not in LAMBDA_ORDERS:
        raise ValueError(f"lambda_order must be one of {LAMBDA_ORDERS}, got {order!r}")
    lam = 2.0 - aff
    lam[0] = 1.0  # aff_{i,i} = 1 exactly; the cosine would only approximate it
    return lam.flip(0) if order == "reference" else lam
