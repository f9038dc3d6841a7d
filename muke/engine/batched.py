"""`CachedShiftedLM.logprobs` of several requests in one forward pass (`memory.optimise_batch`).

Row r of the batch is request r's suffix from its free shift on, on the KV cache of its own prefix: the
prefixes are right-aligned at the longest one (width W_p) and the suffixes left-aligned (width W_s),
padding masked out, each row with its own position ids. Rows never mix, so a row's log-probs and
gradients are its request's alone: more rows share one read of the weights and larger matrix products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from muke.engine import hooks
from muke.engine.forward import CachedShiftedLM
from muke.engine.logprob import target_logprobs
from muke.model import EditableModel, cache_arg


def padded_cache(caches: list[DynamicCache | None], lengths: list[int], width: int, em: EditableModel) -> DynamicCache:
    """One KV cache for a batch of prefixes: request r's keys/values (lengths[r] positions, None for an
    empty prefix) right-aligned at `width` positions, zeros before them (masked out by the attention mask)."""
    per_request = [list(cache) if cache is not None else None for cache in caches]  # [(keys, values, ...)] per layer
    reference = next(layers for layers in per_request if layers is not None)
    batched = DynamicCache()
    for layer in range(em.n_layers):
        keys, values = [], []
        for layers, n in zip(per_request, lengths):
            if layers is None:
                ref = reference[layer][0]
                k = v = ref.new_zeros(1, ref.shape[1], 0, ref.shape[3])  # (1, heads, 0, head_dim)
            else:
                k, v = layers[layer][0][:, :, :n], layers[layer][1][:, :, :n]  # (1, heads, n, head_dim)
            keys.append(F.pad(k, (0, 0, width - n, 0)))
            values.append(F.pad(v, (0, 0, width - n, 0)))
        batched.update(torch.cat(keys), torch.cat(values), layer)  # (R, heads, W_p, head_dim)
    return batched


def batched_logprobs(
    lms: list[CachedShiftedLM],
    free: list[int],
    deltas: torch.Tensor,
    fixed: list[dict[int, torch.Tensor]],
    upto: list[int | None],
) -> list[torch.Tensor]:
    """Row r: lms[r].logprobs([free[r]], [deltas[r]], fixed[r], upto[r]), all rows in ONE forward pass.

    deltas: (R, d); fixed[r]: frozen shifts of request r, all before free[r]. Returns [(1, n_r)].
    """
    em, layer, device = lms[0].em, lms[0].layer, lms[0].em.device
    starts = list(free)
    lengths = [lm.end(u) - s for lm, s, u in zip(lms, starts, upto)]
    width_p, width_s = max(starts), max(lengths)
    prefixes = [lm.prefix(s, f) if s > 0 else (None, None) for lm, s, f in zip(lms, starts, fixed)]
    mask = torch.zeros(len(lms), width_p + width_s, dtype=torch.long, device=device)  # (R, W_p + W_s)
    ids = torch.zeros(len(lms), width_s, dtype=torch.long, device=device)  # (R, W_s)
    hidden = lms[0].hidden.new_zeros(len(lms), width_s, lms[0].hidden.shape[-1])  # (R, W_s, d)
    targets = torch.zeros(len(lms), width_s, dtype=torch.long, device=device)  # (R, W_s): what each row predicts
    for r, (lm, s, n) in enumerate(zip(lms, starts, lengths)):
        mask[r, width_p - s :] = 1  # padding after a suffix is seen by later padding only (causal)
        ids[r, :n] = lm.input_ids[0, s : s + n]
        hidden[r, :n] = lm.hidden[0, s : s + n]
        targets[r, lm.lead(s) : n] = lm.predicted_targets(s, s + n)
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(width_s, device=device)  # (R, W_s)
    cache = padded_cache([c for c, _ in prefixes], starts, width_p, em) if width_p else None
    with (
        hooks.shifts(em.layer(layer), [0], [deltas]),
        hooks.replay_lower_layers(em.layers, layer, hidden, lms[0]._as_tuple),
    ):
        logits = em.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=cache is not None,
            **{cache_arg(em.model): cache},
        ).logits  # (R, W_s, vocab)
    logp = target_logprobs(logits, targets)  # (R, W_s); sliced after: no full-size grads
    out = []
    for r, (lm, s, n) in enumerate(zip(lms, starts, lengths)):
        lp = logp[r : r + 1, lm.lead(s) : n]
        out.append(torch.cat([prefixes[r][1], lp], dim=1) if s > 0 else lp)
    return out
