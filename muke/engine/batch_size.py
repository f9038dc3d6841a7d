"""How many requests share each δ step's forward/backward pass (`memory.optimise_batch`), sized from the
model, the requests and a configured memory budget (hparams.delta_memory_gib), never from the memory free
at the moment: padding and kernel shapes change with the batch, and the δ loop turns a rounding difference
into a different edit, so the same command must make the same batches whatever else runs on the machine.

A batched step holds, for every request, what the backward pass keeps of the layers above l_WM and of the
LM head over the request's suffix (at window 0: its whole target), plus its KV-cache prefix. Per suffix
token and upper layer a llama-style block keeps about 8·d + 6·d_ff activations (norm, q/k/v, attention and
MLP inputs, gate/up outputs and their product) and heads · T attention weights; the head keeps the logits
and the fp32 softmax of the log-prob backward (`logprob.target_logprobs`). The batch's estimate stays within
the budget (DEFAULT_BUDGET_GIB unless configured; the device needs about twice that free beside the model,
so that an estimate off by 2× still fits). Under autocast the budget first loses the bf16 copies of the
upper layers' and the head's weights (`memory.precision`).
"""

from __future__ import annotations

import torch

from muke.engine.memory import upper_linears
from muke.engine.windows import EditSequence
from muke.model import EditableModel

DEFAULT_BUDGET_GIB = 4.0  # hparams.delta_memory_gib when not set
GIB = 1 << 30


def step_bytes(em: EditableModel, seq: EditSequence, layer: int, element: int) -> int:
    """Estimated peak bytes of one request's δ step at window 0 (the longest suffix), `element` bytes per
    activation (2 under bf16 autocast or for a bf16 model, else 4)."""
    cfg = em.model.config
    d, upper = em.hidden_size, em.n_layers - layer - 1
    d_ff = getattr(cfg, "intermediate_size", None) or 4 * d
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) * (d // heads)
    total = len(seq.input_ids[0])
    suffix = total - seq.hook_positions[0]
    vocab = em.lm_head.weight.shape[0]
    per_token = upper * ((8 * d + 6 * d_ff) * element + heads * total * 4) + vocab * (element + 8)
    return suffix * per_token + 2 * em.n_layers * kv * total * element


def cast_weight_bytes(em: EditableModel, layer: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the `dtype` copies that autocast makes of the weights every δ step reads
    (`memory.lower_precision_weights` of `memory.upper_linears`): 0 for weights already in `dtype`."""
    return sum(dtype.itemsize * m.weight.numel() for m in upper_linears(em, layer) if m.weight.dtype != dtype)


def delta_batch_size(
    em: EditableModel,
    seqs: list[EditSequence],
    layer: int,
    autocast: bool = False,
    budget_gib: float = DEFAULT_BUDGET_GIB,
) -> int:
    """Requests per `optimise_batch` call: as many as fit `budget_gib` GiB at the largest request's estimate
    (`step_bytes`), at least 1, at most len(seqs). A function of the model, the requests and the budget
    only: the same on any machine and beside any other process."""
    if budget_gib <= 0:
        raise ValueError(f"delta_memory_gib must be > 0, got {budget_gib}")
    if not seqs:
        return 1
    element = 2 if autocast else em.dtype.itemsize
    largest = max(step_bytes(em, seq, layer, element) for seq in seqs)
    budget = int(budget_gib * GIB) - (cast_weight_bytes(em, layer) if autocast else 0)
    return max(1, min(len(seqs), budget // largest))
