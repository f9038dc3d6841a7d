"""The fine-tuning baselines (docs/ALGORITHM.md §5, "Fine-tuning baselines"): no δ loop, no target memories; the
chosen weights are trained on every target token of the requests' chat prompts, the prompt masked.

- ft: the MLP down-projections of the edited layers (EasyEdit's FT: rewrite_module_tmp mlp.down_proj),
  Adam on fp32 copies, every element kept within ±norm_constraint of its original value (FT-L).
- lora: LoRA adapters (peft) on the named linear modules of the edited layers' blocks, merged into
  ΔW = (α / r) B A after training.

Both stop once the mean target NLL of the batch is below early_stop and return parameter differences
(new − old, fp32), so a WeightUpdate of theirs is applied, reverted, saved and chained like UnKE's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from muke.model import EditableModel
from muke.numerics import check_finite
from muke.update.keys import Target


def target_nll_sum(logits: torch.Tensor, seq) -> tuple[torch.Tensor, int]:
    """(summed NLL of seq's target tokens, their number) from the logits (1, T, vocab) of seq.input_ids:
    every target token, the prompt masked."""
    positions = seq.target_positions.to(logits.device)
    targets = torch.tensor(seq.target_ids, device=logits.device)
    return F.cross_entropy(logits[0, positions].float(), targets, reduction="sum"), len(seq.target_ids)


def loss_and_backward(forward: Callable[[torch.Tensor], torch.Tensor], targets: Sequence[Target]) -> float:
    """Mean target NLL over every target token of the batch; its gradient is accumulated one request at a
    time (one request's activations at a time). forward(input_ids) → logits."""
    total = sum(len(t.seq.target_ids) for t in targets)
    loss = 0.0
    for t in targets:
        nll, _ = target_nll_sum(forward(t.seq.input_ids), t.seq)
        (nll / total).backward()
        loss += nll.item() / total
    return loss


def train(
    forward: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.Tensor],
    targets: Sequence[Target],
    lr: float,
    steps: int,
    early_stop: float,
    weight_decay: float = 0.0,
    after_step: Callable[[], None] | None = None,
) -> list[dict]:
    """Full-batch Adam steps on `params` until the mean target NLL is below early_stop or `steps` steps
    are done; after_step() runs after each (ft's norm bound). Returns the trace [{step, loss}]."""
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    trace = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_and_backward(forward, targets)
        check_finite(f"fine-tuning of {[t.id for t in targets]} at step {step}", loss=torch.tensor(loss))
        trace.append({"step": step, "loss": loss})
        if loss < early_stop:
            break
        opt.step()
        if after_step is not None:
            after_step()
    return trace


def ft_update(
    em: EditableModel,
    targets: Sequence[Target],
    layers: list[int],
    lr: float = 5e-4,
    steps: int = 25,
    norm_constraint: float | None = 5e-5,
    early_stop: float = 1e-2,
    weight_decay: float = 0.0,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """({parameter name: new − old (fp32)}, trace) of fine-tuning the down-projections of `layers`.

    The model's weights are never written: each forward runs with the fp32 copies cast to the model's dtype
    in their place (torch.func.functional_call). With norm_constraint ε, after each step every element
    is clamped to its original value ± ε (FT-L); None: unbounded."""
    names = [_param_name(em, em.down_proj(layer).weight) for layer in layers]
    originals = {n: em.model.get_parameter(n).detach().float() for n in names}
    master = {n: w.clone().requires_grad_(True) for n, w in originals.items()}
    dtype = em.dtype

    def forward(input_ids):
        weights = {n: m.to(dtype) for n, m in master.items()}
        out = torch.func.functional_call(
            em.model, weights, (), {"input_ids": input_ids.to(em.device), "use_cache": False}
        )
        return out.logits

    @torch.no_grad()
    def bound():
        for n, m in master.items():
            m.copy_(torch.minimum(torch.maximum(m, originals[n] - norm_constraint), originals[n] + norm_constraint))

    after = bound if norm_constraint is not None else None
    trace = train(forward, list(master.values()), targets, lr, steps, early_stop, weight_decay, after)
    diffs = {n: (m.detach() - originals[n]) for n, m in master.items()}
    check_finite(f"ft update of {[t.id for t in targets]}", **{n.replace(".", "_"): d for n, d in diffs.items()})
    return diffs, trace


def _param_name(em: EditableModel, param: torch.Tensor) -> str:
    return next(n for n, p in em.model.named_parameters() if p is param)


def lora_targets(em: EditableModel, layers: list[int], modules: Sequence[str]) -> list[str]:
    """The full names of the linear modules named `modules` (their last name part, e.g. q_proj) inside
    the decoder blocks `layers`; an error names a module that a block lacks."""
    out = []
    prefix = {id(em.layer(l)): l for l in layers}
    block_names = {l: n for n, m in em.model.named_modules() if (l := prefix.get(id(m))) is not None}
    for l in layers:
        found = {n.rsplit(".", 1)[-1]: n for n, m in em.layer(l).named_modules() if isinstance(m, nn.Linear)}
        missing = [m for m in modules if m not in found]
        if missing:
            raise ValueError(f"lora_modules: layer {l} has no linear module {missing[0]!r} (it has {sorted(found)})")
        out += [f"{block_names[l]}.{found[m]}" for m in modules]
    return out


def lora_update(
    em: EditableModel,
    targets: Sequence[Target],
    layers: list[int],
    modules: Sequence[str] = ("q_proj", "v_proj"),
    rank: int = 8,
    alpha: float = 32,
    dropout: float = 0.1,
    lr: float = 5e-3,
    steps: int = 70,
    early_stop: float = 1e-2,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """({weight name: (α / r) B A (fp32)}, trace) of training LoRA adapters (peft) of rank r on `modules`
    of the blocks `layers`; adapters in fp32, initialised and dropped out with a generator seeded by
    `seed`. The adapters are taken out again before this returns: the model is as it was."""
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_targets(em, layers, modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    devices = [em.device] if em.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        had_config = hasattr(em.model, "peft_config")
        inject_adapter_in_model(config, em.model)
        try:
            adapters = [em.model.get_submodule(n) for n in names]
            params = [a.lora_A["default"].weight for a in adapters] + [a.lora_B["default"].weight for a in adapters]
            for p in params:
                p.data = p.data.float()
                p.requires_grad_(True)
            for a in adapters:
                a.lora_dropout["default"].train()

            def forward(input_ids):
                return em.model(input_ids=input_ids.to(em.device), use_cache=False).logits

            trace = train(forward, params, targets, lr, steps, early_stop, weight_decay)
            with torch.no_grad():
                diffs = {f"{n}.weight": a.get_delta_weight("default").float() for n, a in zip(names, adapters)}
        finally:
            _remove_adapters(em.model, names, had_config)
    check_finite(f"lora update of {[t.id for t in targets]}", **{n.replace(".", "_"): d for n, d in diffs.items()})
    return diffs, trace


def _remove_adapters(model: nn.Module, names: list[str], had_config: bool) -> None:
    """Put each adapted module's original linear layer back in its place, and drop the `peft_config`
    attribute that peft set on the model (unless it had one)."""
    if not had_config:
        model.__dict__.pop("peft_config", None)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, getattr(owner, child).get_base_layer())
