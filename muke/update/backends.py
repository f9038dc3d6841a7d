"""The weight-update backends by name (docs/ALGORITHM.md §5): what each needs, what it changes, its options and
how it fills a WeightUpdate. Methods, plan, stages, sequential mode and the estimate look a backend up
here (`BACKENDS[name]`) instead of comparing names; a new backend is its module and one entry below."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from muke.model import EditableModel
from muke.update.alphaedit import alphaedit_update
from muke.update.finetune import ft_update, lora_update
from muke.update.keys import blocks, down_projections
from muke.update.memit import memit_update
from muke.update.unke import unke_update


@dataclass(frozen=True)
class Backend:
    """One backend. `fill(em, update, targets, keys, stats, edited_keys, **options)` computes the update
    of `targets` on update.layers and stores it in `update` (factors or params, keys, info)."""

    name: str
    fill: Callable[..., None]
    options: dict[str, str]  # preset key -> keyword of `fill`
    early_stop: float  # the δ loop's early-stop loss of its methods (MemoryConfig.early_stop; docs/ALGORITHM.md §4)
    changes: Callable[
        [EditableModel, Iterable[int]], Iterator[torch.Tensor]
    ]  # parameters its ΔW touches (lora: a subset)
    layers_key: str = "layers"  # the preset key naming its layers (the last: l_WM)
    stats: bool = False  # reads second-moment statistics C of its layers (muke.update.stats)
    preservation: bool = False  # reads preservation samples (option `preservation`: a file)
    edit_keys: bool = False  # in a sequence, preserves the earlier edits' keys (WeightUpdate.keys)
    factored: bool = True  # ΔW as low-rank factors (WeightUpdate.factors), else parameter differences (params)
    memories: bool = True  # maps target memories z; False: trains on the requests' sequences, no δ loop (ft, lora)


def _memit(em, update, targets, keys, stats, edited_keys, **options) -> None:
    update.factors, read = memit_update(em, targets, stats, update.layers, keys, edited_keys=edited_keys, **options)
    update.keys = read if edited_keys is not None else {}


def _alphaedit(em, update, targets, keys, stats, edited_keys, **options) -> None:
    update.factors, read = alphaedit_update(em, targets, stats, update.layers, keys, edited_keys=edited_keys, **options)
    update.keys = read if edited_keys is not None else {}


def _unke(em, update, targets, keys, stats, edited_keys, **options) -> None:
    update.params, update.info["trace"] = unke_update(em, targets, update.layers, keys, **options)


def _ft(em, update, targets, keys, stats, edited_keys, **options) -> None:
    update.params, update.info["trace"] = ft_update(em, targets, update.layers, **options)


def _lora(em, update, targets, keys, stats, edited_keys, **options) -> None:
    update.params, update.info["trace"] = lora_update(em, targets, update.layers, **options)


# C_t of the chat template's keys beside C (docs/ALGORITHM.md §5, template preservation)
TEMPLATE_OPTIONS = dict(
    template_weight="template_weight", template_prompts="template_prompts", template_span="template_span"
)
BACKENDS = {
    "memit": Backend(
        "memit",
        _memit,
        dict(mom2_update_weight="mom2_update_weight", solve_dtype="solve_dtype", **TEMPLATE_OPTIONS),
        early_stop=1e-2,
        changes=down_projections,
        stats=True,
    ),
    "alphaedit": Backend(
        "alphaedit",
        _alphaedit,
        dict(
            null_space_threshold="threshold",
            alphaedit_l2="l2",
            solve_dtype="solve_dtype",
            null_space_cache="cache_dir",
            **TEMPLATE_OPTIONS,
        ),
        early_stop=1e-2,
        changes=down_projections,
        stats=True,
        edit_keys=True,
    ),
    "unke": Backend(
        "unke",
        _unke,
        dict(
            unke_lr="lr",
            unke_weight_decay="weight_decay",
            unke_steps="steps",
            n_preserve="n_preserve",
            preservation="preservation",
            seed="seed",
            unke_delta_dtype="delta_dtype",
        ),
        early_stop=5e-3,
        changes=blocks,
        layers_key="unke_layers",
        preservation=True,
        factored=False,
    ),
    # the fine-tuning baselines: early_stop is their loop's (the mean target NLL), no δ loop runs
    "ft": Backend(
        "ft",
        _ft,
        dict(ft_lr="lr", ft_steps="steps", ft_norm_constraint="norm_constraint", ft_weight_decay="weight_decay"),
        early_stop=1e-2,
        changes=down_projections,
        factored=False,
        memories=False,
    ),
    "lora": Backend(
        "lora",
        _lora,
        dict(
            lora_modules="modules",
            lora_rank="rank",
            lora_alpha="alpha",
            lora_dropout="dropout",
            lora_lr="lr",
            lora_steps="steps",
            lora_weight_decay="weight_decay",
            seed="seed",
        ),
        early_stop=1e-2,
        changes=blocks,
        factored=False,
        memories=False,
    ),
}
