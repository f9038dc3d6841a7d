"""UnKE (docs/ALGORITHM.md §5): fine-tune every parameter of the edited decoder block(s) so that the block maps
the edit keys to the edited outputs and the preservation samples' keys to their old outputs."""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from muke.data import DEFAULT_PRESERVATION, DataError, jsonl_records
from muke.engine import hooks
from muke.engine.windows import render_chat, uses_chat_template
from muke.model import DTYPES, EditableModel, pad
from muke.numerics import check_finite
from muke.update.keys import Target, blocks, edit_context, preserved, read_layer


def load_preservation(path: str | Path) -> list[dict]:
    """Alpaca-style records {instruction, input, output} of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "preservation file not found")
    records = jsonl_records(path, ("instruction", "output"))
    if not records:
        raise DataError(path, "no preservation records")
    return records


def preservation_texts(
    tokenizer,
    records: list[dict],
    n: int,
    rng: random.Random,
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> list[str]:
    """n random records as user/assistant exchanges rendered with the run's chat settings, as the edit
    prompts are (render_chat: `system_prompt` as the system turn, or none; docs/ALGORITHM.md §5); plain text where
    the prompts are plain (chat_template false, or a tokenizer without a template: uses_chat_template)."""
    texts = []
    for rec in rng.sample(records, min(n, len(records))):
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        if uses_chat_template(tokenizer, chat_template):
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
            texts.append(render_chat(tokenizer, messages, system_prompt, generation=False))
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
def record_block(
    em: EditableModel, layer: int, wm_layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[BlockCall, torch.Tensor]:
    """The call of decoder block `layer` in a forward pass (so it can be rerun standalone with the same
    masks and position embeddings, for any architecture) and H: (B, T, d_model) output of l_WM."""
    calls, out = [], []

    def pre(_module, args, kwargs):
        calls.append((args, kwargs))

    with (
        hooks.forward_hook(em.layer(layer), pre, pre=True, with_kwargs=True),
        hooks.capture(em.layer(layer), "output") as block_out,
        hooks.stop_after(em.layer(wm_layer), out),
    ):
        em.model(
            input_ids=input_ids.to(em.device),
            use_cache=False,
            attention_mask=None if attention_mask is None else attention_mask.to(em.device),
        )
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


def fit_block(
    block: nn.Module,
    edits: list[BlockCall],
    edit_outputs: list[torch.Tensor],
    preserve: BlockCall,
    preserve_mask: torch.Tensor,
    lr: float,
    weight_decay: float,
    steps: int,
    trace: list[dict],
    label: int,
) -> nn.Module:
    """UnKE's block fine-tuning on a fp32 copy of `block`: AdamW (weight decay 0 on the norm weights),
    full batch, loss = MSE(block(edit keys), edited outputs) + MSE(block(preservation keys), old outputs)."""
    block = copy.deepcopy(block).float().eval().requires_grad_(True)
    norms = {id(p) for m in block.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)}
    groups = [
        {"params": [p for p in block.parameters() if id(p) not in norms], "weight_decay": weight_decay},
        {"params": [p for p in block.parameters() if id(p) in norms], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, eps=1e-8)
    mask = preserve_mask.to(preserve.output.device)
    for step in range(steps + 1):
        with torch.set_grad_enabled(step < steps):
            edit = _mse(edits, edit_outputs, block)
            keep = _mse([preserve], [preserve.output], block, mask)
            loss = edit + keep
        trace.append({"layer": label, "step": step, "loss": loss.item(), "edit": edit.item(), "preserve": keep.item()})
        if step == steps:
            break  # the last entry is the loss after the final update
        opt.zero_grad()
        loss.backward()
        opt.step()
    return block.requires_grad_(False)


def block_prefix(em: EditableModel, layer: int) -> str:
    return f"{em.adapter.layers}.{layer}."


def edit_rows(
    em: EditableModel, targets: Sequence[Target], contexts: list, wm: int
) -> list[tuple[torch.Tensor, list[int], torch.Tensor]]:
    """(input ids, edit positions, target memories z) the blocks are fitted to: each request's, and one row per
    other rendering of its question (MemoryConfig.renderings) at that rendering's first hook p_1^r, with
    z_1^r = h_1^r + δ_1, δ_1 = z_1 − h_1 the shared first shift (h: l_WM's output on the weights the update
    starts from, which the memories were optimised on)."""
    rows = []
    for t, (input_ids, positions) in zip(targets, contexts):
        rows.append((input_ids, positions, t.z))
        if not t.seq.renderings:
            continue
        delta = t.z[0].to(em.device, torch.float32) - read_layer(em, wm, wm, input_ids)[1][positions[0]]
        for r in t.seq.renderings:
            ids, p = torch.tensor([r.prompt_ids]), r.hook_positions[0]
            rows.append((ids, [p], (read_layer(em, wm, wm, ids)[1][p] + delta)[None]))
    return rows


def unke_update(
    em: EditableModel,
    targets: Sequence[Target],
    layers: list[int],
    keys: str = "sequence",
    lr: float = 2e-4,
    weight_decay: float = 0.01,
    steps: int = 50,
    n_preserve: int = 20,
    preservation: str | Path = DEFAULT_PRESERVATION,
    seed: int = 0,
    delta_dtype: str = "float32",
    system_prompt: str | None = None,
    chat_template: bool = True,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """UnKE: per layer index i of L, block outputs on the edit keys + (z - H(l_WM)) / (L - i) at the edit
    positions (and at the first hook of the question's other renderings, `edit_rows`) become the block's new targets; returns ({parameter name: new - old in `delta_dtype`}, loss
    trace). The change is rounded to delta_dtype before the next layer is fitted on the edited model, so the
    returned differences are exactly the edit the later layers saw (bfloat16: half the bytes of fp32).

    Preservation: n_preserve records (the authors' 20) drawn with a generator seeded by (seed, request ids),
    so a batch gets the same samples whatever else runs, rendered with the run's chat settings (system_prompt,
    chat_template) as the edit prompts are.
    """
    wm = layers[-1]
    contexts = [edit_context(t, keys) for t in targets]
    rng = random.Random(f"{seed}|" + "|".join(t.id for t in targets))
    records = load_preservation(preservation)
    texts = preservation_texts(em.tokenizer, records, n_preserve, rng, system_prompt, chat_template)
    tok = em.tokenizer
    encoded = [tok(t, add_special_tokens=False, truncation=True, max_length=512)["input_ids"] for t in texts]
    pres_ids, pres_mask = pad(encoded, em.pad_id)

    rows = edit_rows(em, targets, contexts, wm)
    diffs, trace = {}, []
    with preserved(blocks(em, layers)):
        for i, layer in enumerate(layers):
            edits, edit_outputs = [], []
            for input_ids, positions, z in rows:
                call, H = record_block(em, layer, wm, input_ids)
                out = call.output.clone()
                z = z.to(out.device, torch.float32)
                out[0, positions] += (z - H[0, positions]) / (len(layers) - i)
                edits.append(call)
                edit_outputs.append(out)
            preserve, _ = record_block(em, layer, layer, pres_ids, pres_mask)
            block = fit_block(
                em.layer(layer), edits, edit_outputs, preserve, pres_mask, lr, weight_decay, steps, trace, layer
            )
            new = dict(block.named_parameters())
            check_finite(
                f"layer {layer}, computed update", **{f"{block_prefix(em, layer)}{name}": p for name, p in new.items()}
            )
            with torch.no_grad():
                for name, p in em.layer(layer).named_parameters():
                    diff = (new[name] - p.float()).to(DTYPES[delta_dtype])
                    diffs[block_prefix(em, layer) + name] = diff.cpu()
                    p.copy_((p.float() + diff).to(p.dtype))
    return diffs, trace
