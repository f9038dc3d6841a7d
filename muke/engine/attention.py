"""Attention kept in fp32 inside bf16 autocast (`MemoryConfig.fp32_attention`, entered by `memory.precision`).

Autocast runs scaled-dot-product attention in bf16, and on a CPU its backward is then twice as slow as in
fp32 (docs/PERF.md section 1), for a small share of the FLOPs. `fp32_attention` swaps the model's attention
implementation X for "fp32-X": X run on fp32 q, k, v with autocast off and its output cast back, under X's
own mask function (without it, transformers builds no mask for an unknown implementation). The q/k/v/o
projections around it stay bf16. Checked on transformers 4.56.0 (`make test-floor`) and 5.25.0.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import partial

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

UPCAST = ("sdpa", "eager")  # the implementations `fp32_attention` wraps


def model_attention(model: torch.nn.Module, name: str):
    """The function implementation `name` runs in `model`: a registered one, or its modeling file's own eager one."""
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    return sys.modules[type(model).__module__].eager_attention_forward


def upcast_attention(inner, module, query, key, value, attention_mask, **kwargs):
    """Attention function `inner` on fp32 q, k, v with autocast off; the output in the query's dtype."""
    with torch.autocast(query.device.type, enabled=False):
        out, weights = inner(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


@contextmanager
def fp32_attention(model: torch.nn.Module):
    """The model's attention core in fp32 for the block (a no-op outside autocast): its implementation X
    replaced by "fp32-X" (`upcast_attention`), X's mask function kept, X put back after."""
    name = model.config._attn_implementation
    if name not in UPCAST:  # flash kernels take no fp32; others: untested, left as they are
        yield
        return
    wrapped = f"fp32-{name}"
    AttentionInterface.register(wrapped, partial(upcast_attention, model_attention(model, name)))
    AttentionMaskInterface.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS[name])
    model.set_attn_implementation(wrapped)
    try:
        yield
    finally:
        model.set_attn_implementation(name)
