"""The δ loop's hyperparameters (docs/ALGORITHM.md §4), each declared once: its default, help text and command-line
form live on its MemoryConfig field; presets, the schema, `muke edit`'s flags and config/README.md follow them
(tests/test_hparams_declared.py). Only torch is imported here, so a command that parses options stays light."""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields

import torch

from muke.engine.objectives import LAMBDA_ORDERS, OBJECTIVES
from muke.engine.windows import KEY_POSITIONS, RENDERING_PREFIXES

AUTOCAST = {None: None, "bfloat16": torch.bfloat16}


def _option(default, help: str, **cli):
    """A MemoryConfig field with its help text; `cli` holds what the command line needs beyond the type
    (flag: a shorter name, choices: the allowed values). `muke edit` makes one flag of each."""
    return field(default=default, metadata={"help": help, **cli})


def _internal(help: str, **default):
    """A MemoryConfig field that the method resolver sets (muke.update.methods.resolve_method), no user option."""
    return field(**default, metadata={"help": help, "internal": True})


@dataclass(frozen=True)
class MemoryConfig:
    """Hyperparameters of the δ loop; defaults are the authors' (docs/ALGORITHM.md §4). Each user option is
    declared here once: its help text, the `muke edit` flag and the preset key (MEMORY_OPTIONS) come from
    the field; config/schema.yaml and config/README.md are checked against it (tests/test_hparams_declared.py)."""

    layer: int = _internal("l_WM: δ is added to this decoder layer's output (the last of layers / unke_layers)")
    objective: str = _internal("the δ loop's objective (muke.engine.objectives), from the method", default="matryoshka")
    window: int | None = _internal(
        "W tokens per window (window, or anyedit_window for anyedit-*); None: one window; ignored by one_for_all",
        default=20,
    )
    lambda_order: str = _option(
        "reference",
        "how the affinity coefficients λ are assigned (Eq. 12): as the equation reads (paper) or as the "
        "authors' code does (reference)",
        choices=LAMBDA_ORDERS,
    )
    affinity_steps: int = _option(3, "T_aff: Adam steps on window i alone before its gradient affinities are measured")
    v_lr: float = _option(0.5, "δ learning rate")
    v_num_grad_steps: int = _option(25, "δ optimisation steps", flag="--v-steps")
    v_weight_decay: float = _option(1e-3, "weight of the penalty ‖δ‖ / ‖h‖² added to the loss")
    clamp_norm_factor: float = _option(4.0, "‖δ‖ ≤ clamp · ‖h‖", flag="--clamp")
    early_stop: float = _option(
        1e-2,
        "stop a window's δ loop once its loss is below this (default: 1e-2 for MEMIT and AlphaEdit, 5e-3 for UnKE)",
    )
    v_stop_prob: float | None = _option(
        None,
        "stop a window's δ loop once each of its tokens has this probability under teacher forcing "
        "(`reproduces`; --v-steps caps it); None: the authors' rule alone",
    )
    system_prompt: str | None = _option(None, "system message of the chat-templated prompt; None: no system turn")
    chat_template: bool = _option(True, "wrap the question in the model's chat template; off: the raw question")
    fast: bool = _option(True, "CachedShiftedLM and shared affinity passes; off: PlainShiftedLM (the same memories)")
    autocast: str | None = _option(
        None,
        "bfloat16: the δ loop's and the affinity's matrix products in bf16, the weights cast once per request (δ, "
        "Adam, the loss, the weight solves and the attention core (fp32_attention) stay fp32); none: the model's "
        "dtype. Speed and results: see docs/PERF.md, section 3 'bf16 autocast of the δ optimisation'",
        choices=tuple(AUTOCAST),
    )
    fp32_attention: bool = _option(True, "under autocast, the attention core (`attention.fp32_attention`) in fp32")
    key_position: str = _option(
        "template",
        "where window 0's memory is written and its key read: the prompt's last token, a chat-template token "
        "every prompt shares (template, the paper's), or the last token of the user's own text (question)",
        choices=KEY_POSITIONS,
    )
    renderings: int = _option(
        1,
        "renderings of the question window 0's δ is optimised over, one δ for all (the mean of their losses), "
        "whose keys the MEMIT family averages and at whose first hooks UnKE fits too: 1, the question alone; k, also the question behind the first k - 1 "
        "in-turn prefixes of muke.engine.windows.RENDERING_PREFIXES (MEMIT's context templates in the user turn)",
    )
    memory_noise: float = _option(
        0.0,
        "σ: Gaussian noise of norm ≈ σ · ‖h‖, drawn afresh at every δ step (seeded by window and step), added to "
        "the optimised shifts in the forward pass only (after NAMET's noise on the memories); 0: none",
    )

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
        if self.v_stop_prob is not None and not 0 < self.v_stop_prob < 1:
            raise ValueError(f"v_stop_prob must lie in (0, 1), got {self.v_stop_prob!r}")
        if not 1 <= self.renderings <= len(RENDERING_PREFIXES) + 1:
            raise ValueError(f"renderings must lie in 1..{len(RENDERING_PREFIXES) + 1}, got {self.renderings!r}")
        if self.renderings > 1 and self.objective == "parallel_nll":
            raise ValueError("renderings > 1 needs a window-by-window objective, not parallel_nll")
        if self.memory_noise < 0:
            raise ValueError(f"memory_noise must be ≥ 0, got {self.memory_noise!r}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"autocast must be one of {sorted(AUTOCAST, key=str)}, got {self.autocast!r}")


def user_options() -> tuple[Field, ...]:
    """MemoryConfig's fields that presets, configs and flags set (muke.update.methods.MEMORY_OPTIONS), in
    order; not those the method resolver sets."""
    return tuple(f for f in fields(MemoryConfig) if not f.metadata.get("internal"))
