"""The hyperparameters of `muke edit`: a preset's, then the flags' on top. The δ loop's flags are made from
muke.engine.memory.MemoryConfig's fields (name, type, help), so each option is declared once."""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import Field
from pathlib import Path

NONE = "none"  # on the command line: None, over a preset's value (`--autocast none`)


def _flag(p, f: Field, hint) -> None:
    """One flag of MemoryConfig field f: --NAME (or its metadata's `flag`), default None (not given)."""
    meta, kind = f.metadata, next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    flag, text = meta.get("flag", "--" + f.name.replace("_", "-")), f"{meta['help']} ({f.name})"
    if kind is bool:
        p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
    elif "choices" in meta:
        p.add_argument(flag, dest=f.name, choices=[NONE if c is None else c for c in meta["choices"]], help=text)
    else:
        p.add_argument(flag, dest=f.name, type=kind, help=text)


def memory_flags(p, names: typing.Collection[str] | None = None) -> None:
    """The flags of MemoryConfig's user options (muke.engine.memory.user_options), or of those in `names`."""
    from muke.engine.config import MemoryConfig, user_options

    hints = typing.get_type_hints(MemoryConfig)
    for f in user_options():
        if names is None or f.name in names:
            _flag(p, f, hints[f.name])


def hparam_flags(p) -> None:
    """The flags of `muke edit` that set a preset key: layers and windows, the δ loop's, the backends'."""
    p.add_argument("--layers", type=int, nargs="+")
    p.add_argument("--unke-layers", type=int, nargs="+")
    p.add_argument("--window", type=int)
    p.add_argument("--anyedit-window", type=int)
    p.add_argument("--mom2-update-weight", type=float)
    p.add_argument("--unke-steps", type=int)
    p.add_argument("--n-preserve", type=int)
    p.add_argument("--edit-passes", type=int, help="passes of the weight update (iterative editing; 1: one update)")
    memory_flags(p.add_argument_group("δ loop (MemoryConfig)", "default: the preset's value, else muke's"))


def _flag_values(args) -> dict:
    """The preset keys that hparam_flags' flags set (`none` read as None)."""
    from muke.engine.config import user_options

    keys = ["layers", "unke_layers", "window", "anyedit_window", "mom2_update_weight", "unke_steps", "n_preserve"]
    keys += ["edit_passes"]
    values = {k: getattr(args, k) for k in keys + [f.name for f in user_options()]}
    nullable = {f.name for f in user_options() if None in f.metadata.get("choices", ())}
    return {k: None if k in nullable and v == NONE else v for k, v in values.items() if v is not None}


def preset_hparams(args) -> tuple[str | None, dict]:
    """(preset path, hyperparameters) of an edit: the preset's `hparams` and its `method_hparams` of
    --method (--preset NAME or FILE, else the shipped preset of --model, if any), then the explicit
    command-line values on top.

    --preset may also name a YAML file holding just a hyperparameter mapping; either kind is checked
    against config/schema.yaml, so a misspelt key is an error, not a silently ignored setting."""
    from muke.workflow.config import check, load_preset, load_yaml, preset_for_model, subschema

    name = args.preset or preset_for_model(args.model)
    hparams = {}
    plain = name and Path(name).is_file() and not {"source", "hparams"} & set(load_yaml(name))
    if plain:
        hparams = check(load_yaml(name), subschema("$defs/hparams"), f"hyperparameters {name}", fill_defaults=False)
    elif name:
        name, preset = load_preset(name)
        hparams = {**preset.get("hparams", {}), **preset.get("method_hparams", {}).get(args.method, {})}
    if name:
        print(f"muke: hyperparameters of {name}", file=sys.stderr)
    hparams.update(_flag_values(args))
    return name, hparams
