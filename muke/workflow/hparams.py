"""Hyperparameters of a run, resolved in one order, each value with the config key that set it; sweeps.

Resolution (later wins):
  1. muke.update.methods.DEFAULT_PRESET        source  hparams.K (not set: muke's default)
  2. the model preset's `hparams`                      hparams.K (preset config/models/<preset>.yaml)
     then its `method_hparams.<method>`                method_hparams.<method>.K (preset ...)
  3. config `hparams`                                  hparams.K
  4. config `models.<name>.hparams`                    models.<name>.hparams.K
  5. config `method_hparams.<method>`                  method_hparams.<method>.K
  6. one point of config `sweep`                       sweep.K
A list given for a scalar hyperparameter (a list of lists for the LIST_KEYS) is a
sweep axis at its level; a later fixed value replaces an earlier axis and the other way round. Every
value of `sweep` is an axis. Keys "generation.<setting>" (in `sweep` only) sweep generation settings.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from muke.workflow.config import ConfigError, check, subschema

LIST_KEYS = ("layers", "unke_layers", "unke_layer", "lora_modules")  # hyperparameters whose value is a list
GENERATION = "generation."


@dataclass(frozen=True)
class Setting:
    """A resolved hyperparameter (or sweep axis: `value` its list of values) and the key that set it."""

    value: Any
    source: str


@dataclass(frozen=True)
class Level:
    """One level of the resolution: `source` formats a key into the config key it is written under."""

    source: str
    values: dict
    all_axes: bool = False  # config `sweep`: every value is a list of values


def is_sweep(key: str, value) -> bool:
    if not isinstance(value, list):
        return False
    if key.split(".")[-1] in LIST_KEYS:
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


def levels(config: dict, model, method: str | None) -> list[Level]:
    """The levels of a model (muke.workflow.inputs.Model) × method (None: levels 1–4, the unedited model's)."""
    from muke.update.methods import DEFAULT_PRESET

    out = [
        Level("hparams.{} (not set: muke's default)", DEFAULT_PRESET),
        Level("hparams.{} (preset " + model.preset_path + ")", model.preset.get("hparams", {})),
        Level("hparams.{}", config["hparams"]),
        Level(f"models.{model.name}.hparams.{{}}", model.entry.get("hparams", {})),
    ]
    if method is not None:
        preset_method = model.preset.get("method_hparams", {}).get(method, {})
        out.insert(2, Level(f"method_hparams.{method}.{{}} (preset {model.preset_path})", preset_method))
        out += [
            Level(f"method_hparams.{method}.{{}}", config["method_hparams"].get(method, {})),
            Level("sweep.{}", config["sweep"], all_axes=True),
        ]
    return out


def resolve(levels: list[Level]) -> tuple[dict[str, Setting], dict[str, Setting]]:
    """(fixed settings, sweep axes) after every level, in order."""
    fixed, axes = {}, {}
    for level in levels:
        for key, value in level.values.items():
            axis = level.all_axes or is_sweep(key, value)
            (fixed if axis else axes).pop(key, None)
            (axes if axis else fixed)[key] = Setting(value, level.source.format(key))
    return fixed, axes


def sweep_points(axes: dict[str, Setting]) -> list[dict[str, Setting]]:
    """Cartesian product of the axes, in the order given ([{}] without axes); each value keeps its source."""
    keys = list(axes)
    return [
        {k: Setting(v, axes[k].source) for k, v in zip(keys, values)}
        for values in itertools.product(*(axes[k].value for k in keys))
    ]


def values(settings: dict[str, Setting]) -> dict:
    return {k: s.value for k, s in settings.items()}


def source_of(settings: dict[str, Setting], names: list[str]) -> str:
    """The config key behind the first of `names` that is set (names: the spellings of one value)."""
    for name in names:
        if name in settings:
            return settings[name].source
    return f"hparams.{names[-1]} (not set)"


def check_axes(axes: dict[str, Setting], schema_path=None) -> None:
    """Each value of a sweep must be a valid value of its key, and not itself a sweep."""
    schemas = {
        "hparams": subschema("$defs/hparams", schema_path),
        "generation": subschema("properties/generation", schema_path),
    }
    for key, axis in axes.items():
        section, name = ("generation", key[len(GENERATION) :]) if key.startswith(GENERATION) else ("hparams", key)
        for value in axis.value:
            try:
                check({name: value}, schemas[section], fill_defaults=False)
            except ConfigError as e:
                raise ConfigError(
                    f"config key {axis.source}: value {value!r} is not valid ({str(e).splitlines()[-1].strip()})"
                ) from None
            if section == "hparams" and is_sweep(key, value):
                raise ConfigError(f"config key {axis.source}: value {value!r} is a list (a sweep in a sweep)")


def generation(config: dict, hparams: dict, point: dict) -> dict:
    """The generation settings of a run: config `generation`, the point's generation.* values, and
    the chat settings the δ optimisation used (system_prompt, chat_template); `seed` only where the
    protocol samples."""
    gen = dict(config["generation"])
    gen.update({k[len(GENERATION) :]: v for k, v in point.items() if k.startswith(GENERATION)})
    gen["system_prompt"] = hparams.get("system_prompt")
    gen["chat_template"] = hparams.get("chat_template", True)
    if gen.get("protocol", "greedy") == "greedy":  # greedy decoding draws nothing: its seed is no parameter
        gen.pop("seed", None)
    return gen


def without_generation(point: dict) -> dict:
    return {k: v for k, v in point.items() if not k.startswith(GENERATION)}


def generation_axes(config: dict) -> dict[str, Setting]:
    """The sweep axes of the unedited model's runs: config `sweep`'s generation.* keys."""
    return {k: Setting(v, f"sweep.{k}") for k, v in config["sweep"].items() if k.startswith(GENERATION)}
