"""log p of given target tokens from logits, log-softmax and gather fused (the δ loop's loss terms).

lp_t = x_t[y_t] - logsumexp(x_t), in fp32 at least (fp32 for bf16 logits under autocast). The forward
keeps the logits it was given and the log-normaliser (t,), not a (t, vocab) log-softmax; the backward
builds ∂lp/∂x = g (onehot(y) - softmax(x)) in one (t, vocab) tensor, where log_softmax + gather take
a zero-filled scatter, the log-softmax output and its gradient (four passes over the vocabulary).
"""

from __future__ import annotations

import torch


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lse = wide.logsumexp(-1)  # (..., )
        ctx.save_for_backward(logits, targets, lse)
        return wide.gather(-1, targets[..., None])[..., 0] - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        out = (logits.to(lse.dtype) - lse[..., None]).exp_().mul_(-grad[..., None])  # -g softmax(x): (..., vocab)
        out.scatter_add_(-1, targets[..., None], grad[..., None])
        return out.to(logits.dtype), None


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., targets], fp32 or wider: logits (..., vocab), targets (...) → (...)."""
    return _TargetLogprobs.apply(logits, targets)
