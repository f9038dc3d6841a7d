"""The workflow config and model presets: YAML loading and JSON-schema checks with readable errors.

Every error is a ConfigError with one line per problem, each naming the dotted config key at fault
("unknown config key generation.max_new_toks (allowed: ...)", "config key hparams.v_lr: ...").
The schema's defaults are filled in as it checks.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the repository: config/, resources/, workflow/
PRESETS = ROOT / "config" / "models"  # the shipped model presets


class ConfigError(ValueError):
    """A config that cannot run; the message names the config key (dotted path) at fault."""


def load_yaml(path: str | Path) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f)
    return data if data is not None else {}


@cache
def schema(path: str | Path | None = None) -> dict:
    """config/schema.yaml (or the schema at `path`), read once per process."""
    return load_yaml(path or ROOT / "config" / "schema.yaml")


def _key(key: str) -> str:
    """A config key as written in a message: quoted where it is empty or holds spaces or control characters."""
    return key if key.isprintable() and key and key.strip() == key and " " not in key else repr(key)


def _where(path) -> str:
    parts = [_key(p) if isinstance(p, str) else f"[{p}]" for p in path]
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _message(error) -> str:
    """One readable line per schema error: the dotted key, then what is wrong."""
    where = _where(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        keys = ", ".join(f"{where}.{_key(k)}" if where != "(top level)" else _key(k) for k in extra)
        return f"unknown config key {keys}{hint}"
    if error.validator == "propertyNames":
        return f"config key {where}: name {error.instance!r} is not allowed: {error.message}"
    if error.validator in ("anyOf", "oneOf") and error.context:
        best = min(error.context, key=lambda e: len(e.absolute_path))
        return f"config key {where}: {error.instance!r} is not valid ({best.message})"
    return f"config key {where}: {error.message}"


def check(data: dict, schema: dict, what: str = "config", fill_defaults: bool = True) -> dict:
    """Validate against a JSON schema (raising ConfigError with one line per error, each naming the
    dotted key) and fill in the schema's defaults. Returns `data` (changed in place)."""
    from jsonschema import Draft202012Validator, validators

    base = Draft202012Validator

    def set_defaults(validator, properties, instance, schema):
        if fill_defaults and isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(key, copy.deepcopy(sub["default"]))
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    Validator = validators.extend(base, {"properties": set_defaults})
    errors = sorted(Validator(schema).iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = list(dict.fromkeys(_message(e) for e in errors))
        raise ConfigError(f"invalid {what}:\n  " + "\n  ".join(lines))
    return data


def subschema(name: str, schema_path: str | Path | None = None) -> dict:
    """A part of the schema that can check a value on its own: "$defs/preset", "properties/generation"."""
    full = schema(schema_path)
    section, key = name.split("/")
    return {**full[section][key], "$defs": full["$defs"]}


def check_config(config: dict, schema_path: str | Path | None = None) -> dict:
    """Validate the workflow config against config/schema.yaml and fill in defaults."""
    return check(config, schema(schema_path), "config")


def check_preset(preset: dict, path, schema_path: str | Path | None = None) -> dict:
    """Validate a model preset (config/models/*.yaml) and fill in defaults."""
    return check(preset, subschema("$defs/preset", schema_path), f"model preset {path}")


def load_preset(name: str, folder: str | Path = PRESETS, schema_path: str | Path | None = None) -> tuple[str, dict]:
    """(path, checked preset) of a preset named by file stem (`folder`/NAME.yaml) or by a .yaml path."""
    folder = Path(folder)
    path = Path(name) if name.endswith((".yaml", ".yml")) else folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ConfigError(f"no preset {name!r} ({path} not found; known: {known})")
    return str(path), check_preset(load_yaml(path), path, schema_path)


def preset_for_model(model: str | Path, folder: str | Path = PRESETS) -> str | None:
    """The shipped preset of a model given as a hub id or a local folder, else None: the preset whose
    `source` is that hub id, the preset of a GGUF recipe (smollm2, gemma3-270m) for the folder muke converts it
    into, or the preset named like the folder (case-insensitive). Presets of tiny test models are never chosen
    this way."""
    from muke.gguf import RECIPES, converted_path

    local = Path(model).expanduser()
    for path in sorted(Path(folder).glob("*.yaml")):
        source = load_yaml(path).get("source")
        if source == str(model) or (
            source in RECIPES and local.is_dir() and local.resolve() == converted_path(source).resolve()
        ):
            return str(path)
        if source != "tiny" and local.is_dir() and local.name.lower() == path.stem:
            return str(path)
    return None
