"""The workflow plan: which stage jobs a config asks for, and the identity of each.

A stage's identity is a short hash of (its own parameters, the identities of its inputs, the code it
runs: muke.workflow.identity). Output paths carry it — results/updates/{model}/{dataset}/{method}-{identity}/
shard{k}... — so changing one hyperparameter creates new paths for exactly the stages it reaches (and
the ones below them), setting it back finds the old files, and a sweep is one DAG whose runs never
overwrite each other. The Snakefile builds one `Plan` and its rules only look things up here; the
stages (muke/workflow/stages/) receive their parameters as the JSON `Spec` this module writes.
Hyperparameters are resolved by muke.workflow.hparams (its docstring gives the order).
"""

from __future__ import annotations

import os
from pathlib import Path

from muke.data import DEFAULT_PRESERVATION
from muke.engine.windows import chat_settings
from muke.update.backends import BACKENDS
from muke.update.memories import budget_params
from muke.update.methods import layer_keys, parse_method, resolve_method
from muke.update.sequential import SEQUENCE_OPTIONS, check_options
from muke.workflow import hparams as hp
from muke.workflow.config import ROOT, ConfigError, check_config
from muke.workflow.identity import Spec, file_identity
from muke.workflow.inputs import Model, dataset, locality_retention, model, preset_file
from muke.workflow.report_spec import report_inputs, report_spec
from muke.workflow.runs import PRE_EDIT, Pair, Run

STATS_DEFAULTS = {"max_docs": None, "max_length": None, "seed": 0, "text_field": "text", "batch_tokens": 8192}
RESOURCE_DEFAULTS = {"gpu": 0, "mem_mb": 4000, "runtime": 60, "cpus_per_task": 1}
REPORT_RESOURCES = {"gpu": 0, "mem_mb": 2000, "runtime": 30, "cpus_per_task": 1}


class Plan:
    """Every job the config asks for, with paths and specs; built once per Snakemake invocation."""

    def __init__(self, config: dict, basedir: str | Path = ROOT, check_schema: bool = True):
        self.basedir = Path(basedir)
        self.schema_path = str(self.basedir / "config" / "schema.yaml")
        self.config = check_config(config, self.schema_path) if check_schema else config
        self.results = self.config["results"].rstrip("/")
        self.models = {
            name: model(self.basedir, name, entry, self.schema_path) for name, entry in self.config["models"].items()
        }
        self.datasets = {name: dataset(name, entry) for name, entry in self.config["datasets"].items()}
        self.runs: list[Run] = []
        self.pre_edit_locality: dict[str, Spec] = {}
        self.layer_traces: dict[tuple[str, str], Spec] = {}  # (model, dataset) -> its trace_layers job
        self._index: dict[tuple, Run] = {}
        self._stats: dict[tuple[str, str], tuple[Model, Spec]] = {}
        self._paths: dict[str, str] = {}  # spec identity -> a path it reads, not part of the identity
        self._locality = self._locality_settings()
        self._build()

    # ------------------------------------------------------------------ runs

    def _build(self) -> None:
        for method in self.config["methods"]:
            try:
                parse_method(method)
            except ValueError as e:
                raise ConfigError(f"config key methods: {e}") from None
        for m in self.models.values():
            for d in self.datasets.values():
                pair = Pair(m, d)
                if self.config["trace"]["enabled"]:
                    self._add_trace(pair)
                if self.config["pre_edit"]:
                    self._add_pre_edit(pair)
                for method in self.config["methods"]:
                    fixed, axes = hp.resolve(hp.levels(self.config, m, method))
                    hp.check_axes(axes, self.schema_path)
                    for point in hp.sweep_points(axes):
                        self._add_run(pair, method, {**fixed, **point}, hp.values(point))

    def _add_pre_edit(self, pair: Pair) -> None:
        fixed, _ = hp.resolve(hp.levels(self.config, pair.model, None))
        hparams = hp.values(fixed)
        for point in hp.sweep_points(hp.generation_axes(self.config)):
            run = pair.run(PRE_EDIT, hp.values(point), hparams)
            run.generate = pair.generate(hparams, self.config, run.setting, {"model": pair.model.spec.identity})
            run.score = Spec("score", dict(self.config["score"]), {"generate": run.generate.identity})
            self._register(run)
        params, inputs = self._locality
        if self.config["locality"]["enabled"] and pair.model.name not in self.pre_edit_locality:
            self.pre_edit_locality[pair.model.name] = Spec(
                "locality",
                {**self._with_chat(params, hparams), "dtype": pair.model.dtype, "edits": []},
                {"model": pair.model.spec.identity, **inputs},
            )

    def _add_trace(self, pair: Pair) -> None:
        """trace_layers of one model × dataset: the trace settings (batch_size never changes a result), the
        model's window W and prompt format, and the dataset's selection."""
        hparams = hp.values(hp.resolve(hp.levels(self.config, pair.model, None))[0])
        settings = {k: v for k, v in self.config["trace"].items() if k not in ("enabled", "batch_size")}
        prompt = chat_settings(hparams)
        params = {**settings, **prompt, "window": hparams["window"], "dtype": pair.model.dtype}
        spec = Spec(
            "trace_layers", {**params, "selection": pair.dataset.selection}, {"model": pair.model.spec.identity}
        )
        self.layer_traces[(pair.model.name, pair.dataset.name)] = spec

    def _add_run(self, pair: Pair, method: str, settings: dict[str, hp.Setting], point: dict) -> None:
        """The run of one method at one sweep point (`settings`: every resolved hyperparameter)."""
        hparams = hp.values(settings)
        try:
            memory, backend, options = resolve_method(method, hp.without_generation(hparams))
        except ValueError as e:
            raise ConfigError(f"hyperparameters of method {method} (model {pair.model.name}): {e}") from None
        key = hp.source_of(settings, layer_keys(backend))
        self._check_layers(pair.model, method, options["layers"], key)
        if self.config["editing"]["mode"] == "sequential":
            return self._add_sequence(pair, method, hparams, point, memory, backend, options)
        run = pair.run(method, point, hp.without_generation(hparams))
        if BACKENDS[backend].memories:  # else the update stage reads the requests itself (ft, lora)
            run.memories = self._memories_spec(pair, memory, hparams)
        run.update = self._update_spec(run, backend, options, memory)
        run.generate = pair.generate(hparams, self.config, point, {"update": run.update.identity})
        run.score = Spec("score", dict(self.config["score"]), {"generate": run.generate.identity})
        loc, (params, inputs) = self.config["locality"], self._locality
        if loc["enabled"] and loc["edits"] > 0:
            edits = pair.dataset.request_ids[: loc["edits"]]
            run.locality = Spec(
                "locality",
                {**self._with_chat(params, hparams), "dtype": pair.model.dtype, "edits": edits},
                {"update": run.update.identity, **inputs},
            )
        self._register(run)

    @staticmethod
    def _memories_spec(pair: Pair, memory: dict, hparams: dict) -> Spec:
        """optimize_memories of a run: the δ loop's options, its batching and the dataset's selection."""
        return Spec(
            "optimize_memories",
            {
                "memory": memory,
                "dtype": pair.model.dtype,
                "batch": hparams.get("delta_batch_size", "auto"),
                **budget_params(hparams),
                "selection": pair.dataset.selection,
            },
            {"model": pair.model.spec.identity},
        )

    def _add_sequence(self, pair: Pair, method: str, hparams: dict, point: dict, memory, backend, options) -> None:
        """editing.mode sequential: one edit_sequence job (its identity without the checkpoints, so that
        changing them never redoes the edits; with its `_sequence_options`) and a run per checkpoint, labelled
        n_edits, whose generate / score / locality read the model edited with the chain's first batches."""
        editing, n = self.config["editing"], len(pair.dataset.request_ids)
        size, checkpoints = editing["batch_size"], editing["checkpoints"] or [n]
        for k in checkpoints:
            if k > n or (k % size and k != n):
                raise ConfigError(
                    f"config key editing.checkpoints: {k} edits is not a multiple of editing.batch_size {size} "
                    f"of at most the {n} requests of dataset {pair.dataset.name}"
                )
        first = pair.run(method, point, hp.without_generation(hparams))
        inputs, opts, preservation = self._backend_inputs(first, backend, options)
        sequence = Spec(
            "edit_sequence",
            {
                "method": method,
                "memory": memory,
                "backend": backend,
                "options": opts,
                "batch_size": size,
                **self._sequence_options(backend, method, opts, memory),
                "dtype": pair.model.dtype,
                "selection": {**pair.dataset.selection, "shard_size": n},
            },
            {"model": pair.model.spec.identity, **inputs},
        )
        if preservation is not None:
            self._paths[sequence.identity] = preservation
        loc, (params, loc_inputs) = self.config["locality"], self._locality
        for k in sorted(set(checkpoints)):
            run = pair.run(method, {**point, "n_edits": k}, hp.without_generation(hparams))
            run.stats, run.sequence, run.n_edits = first.stats, sequence, k
            selection = {**pair.dataset.selection, "limit": k, "shard_size": k}  # the requests edited so far
            run.generate = Spec(
                "generate",
                {
                    "generation": hp.generation(self.config, hparams, point),
                    "dtype": pair.model.dtype,
                    "selection": selection,
                    "n_edits": k,
                },
                {"sequence": sequence.identity},
            )
            run.score = Spec("score", dict(self.config["score"]), {"generate": run.generate.identity})
            if loc["enabled"]:
                run.locality = Spec(
                    "locality",
                    {**self._with_chat(params, hparams), "dtype": pair.model.dtype, "edits": [], "n_edits": k},
                    {"sequence": sequence.identity, **loc_inputs},
                )
            self._register(run)

    def _sequence_options(self, backend: str, method: str, options: dict, memory: dict) -> dict:
        """editing.preserve_earlier / weight_growth / resolve_every / recheck_earlier where they are not their
        defaults (a sequence made before them keeps its identity), checked against the backend and the run's
        edit_passes and stop rule (muke.update.sequential.check_options);
        preserve_earlier left out where the backend preserves the earlier keys anyway (AlphaEdit: the same edits)."""
        editing = self.config["editing"]
        chosen = {k: editing[k] for k, default in SEQUENCE_OPTIONS.items() if editing[k] != default}
        try:
            check_options(
                backend, **chosen, edit_passes=options.get("edit_passes", 1), stop_prob=memory.get("v_stop_prob")
            )
        except ValueError as e:
            raise ConfigError(f"config key editing.{e} (method {method})") from None
        if BACKENDS[backend].edit_keys:
            chosen.pop("preserve_earlier", None)
        return chosen

    def _backend_inputs(self, run: Run, backend: str, options: dict) -> tuple[dict, dict, str | None]:
        """(input identities, options, preservation path) of a weight update: the statistics of a backend
        that reads them (run.stats is set; the MEMIT family), the preservation samples of one that reads
        them (by content; the path leaves the options; UnKE)."""
        if BACKENDS[backend].stats:
            run.stats = self._stats_spec(run.model, options["layers"])
            return {"stats": run.stats.identity}, options, None
        if not BACKENDS[backend].preservation:
            return {}, options, None
        options = dict(options)
        preservation = options.pop("preservation", None) or str(DEFAULT_PRESERVATION)
        if not Path(preservation).is_file():
            raise ConfigError(f"config key hparams.preservation: file {preservation!r} not found")
        return {"preservation": file_identity(preservation)}, options, preservation

    def _update_spec(self, run: Run, backend: str, options: dict, memory: dict) -> Spec:
        """update_weights of a run; the MEMIT family's needs statistics, UnKE's its preservation samples. It
        reads the run's target memories or, for a backend without them (ft, lora), the model and the
        dataset's selection, its requests encoded as `memory` says (muke.update.methods.without_delta_loop);
        with edit_passes > 1 the δ loop's options too."""
        inputs, options, preservation = self._backend_inputs(run, backend, options)
        params = {
            "method": run.method,
            "backend": backend,
            "options": options,
            "edit_batch_size": run.hparams.get("edit_batch_size", 1),
            "dtype": run.model.dtype,
        }
        if run.memories is None:
            params.update(memory=memory, selection=run.dataset.selection)
            inputs = {"model": run.model.spec.identity, **inputs}
        else:
            inputs = {"memories": run.memories.identity, **inputs}
            if options.get("edit_passes", 1) > 1:  # its further passes run the δ loop (muke.update.edit.further_passes)
                params["memory"] = memory
        spec = Spec("update_weights", params, inputs)
        if preservation is not None:
            self._paths[spec.identity] = preservation
        return spec

    @staticmethod
    def _check_layers(model: Model, method: str, layers: list[int], key: str) -> None:
        """Every edited layer must exist (where the plan knows the model's number of layers)."""
        n = model.n_layers
        bad = [layer for layer in layers if n is not None and layer >= n]
        if bad:
            raise ConfigError(
                f"config key {key}: layer {bad[0]} is out of range: "
                f"model {model.name} has {n} layers (0..{n - 1}) (method {method})"
            )

    def _stats_spec(self, model: Model, layers: list[int]) -> Spec:
        """Statistics for one model and layer set; the corpus enters by content, not by path."""
        user = {**self.config["stats"], **model.entry.get("stats", {})}
        stats = {**STATS_DEFAULTS, **model.preset["stats"], **user}
        corpus = stats.get("corpus")
        if not corpus:
            raise ConfigError(
                f"config key stats.corpus: model {model.name} (preset {model.preset_path}) names no corpus"
            )
        if corpus.startswith("hf:"):
            corpus_id = {"hf": corpus}
        else:
            if "corpus" not in user:
                corpus = preset_file(self.basedir, corpus)
            if not Path(corpus).is_file():
                raise ConfigError(f"config key stats.corpus (model {model.name}): corpus file {corpus!r} not found")
            corpus_id = file_identity(corpus)
        params = {"layers": sorted(layers), "dtype": model.dtype, **{k: stats[k] for k in STATS_DEFAULTS}}
        if stats.get("chat"):  # in the identity only when on: existing statistics keep theirs
            params["chat"] = True
        spec = Spec("collect_stats", params, {"model": model.spec.identity, "corpus": corpus_id})
        self._stats[(model.name, self.stats_id(spec))] = (model, spec)
        self._paths[spec.identity] = corpus
        return spec

    def _locality_settings(self) -> tuple[dict, dict]:
        """(params, input identities) that every locality job shares."""
        loc = self.config["locality"]
        params = {k: loc[k] for k in ("tasks", "limit", "num_fewshot", "gen_kwargs", "batch_size", "include_path")}
        if not loc["enabled"]:
            return params, {}
        for key, paths in (("include_path", [loc["include_path"]]), ("data", loc["data"])):
            for p in paths:
                if p and not Path(p).exists():
                    raise ConfigError(
                        f"config key locality.{key}: {p!r} not found "
                        f"(relative paths are taken from the working directory {os.getcwd()})"
                    )
        inputs = {p: file_identity(p) for p in [loc["include_path"], *loc["data"]] if p}
        params["retention"], retention_inputs = locality_retention(loc["retention"])
        return params, {**inputs, **retention_inputs}

    @staticmethod
    def _with_chat(params: dict, hparams: dict) -> dict:
        """Locality parameters whose retention prompts are rendered as the run's own (system_prompt,
        chat_template), as the answers to its edit requests are."""
        if not params["retention"].get("enabled"):
            return params
        chat = chat_settings(hparams)
        return {**params, "retention": {**params["retention"], **chat}}

    def _register(self, run: Run) -> None:
        key = (run.model.name, run.dataset.name)
        for stage, spec in run.specs().items():
            if stage != "stats":
                self._index.setdefault((stage, *key, run.run_id(spec)), run)
        if not any(
            r.score.identity == run.score.identity and r.method == run.method and (r.model.name, r.dataset.name) == key
            for r in self.runs
        ):
            self.runs.append(run)

    # ------------------------------------------------------------------ lookups (rule input functions)

    def model_by_id(self, model_id: str) -> Model:
        for m in self.models.values():
            if m.id == model_id:
                return m
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

    def stats_corpus(self, spec: Spec) -> str:
        """The corpus path (or hf: name) of a statistics spec."""
        return self._paths[spec.identity]

    def preservation_path(self, run: Run) -> str:
        """UnKE's preservation file of a run's update (or sequence)."""
        return self._paths[(run.update or run.sequence).identity]

    @staticmethod
    def stats_id(spec: Spec) -> str:
        return "L" + "-".join(map(str, spec.params["layers"])) + f"-{spec.identity}"

    def resources(self, stage: str, model: Model | None) -> dict:
        """Resources of a stage's jobs from the model preset: `resources.default` updated by `resources.<stage>`."""
        if model is None:
            return dict(REPORT_RESOURCES)
        preset, entry = model.preset.get("resources", {}), model.entry.get("resources", {})
        return {
            **RESOURCE_DEFAULTS,
            **preset.get("default", {}),
            **entry.get("default", {}),
            **preset.get(stage, {}),
            **entry.get(stage, {}),
        }

    # ------------------------------------------------------------------ paths

    def model_dir(self, model: Model) -> str:
        return f"{self.results}/models/{model.id}"

    def stats_path(self, model: Model, spec: Spec) -> str:
        return f"{self.results}/stats/{model.name}/{self.stats_id(spec)}.safetensors"

    def _dir(self, area: str, run: Run, spec: Spec) -> str:
        return f"{self.results}/{area}/{run.model.name}/{run.dataset.name}/{run.run_id(spec)}"

    def memories_path(self, run: Run, shard: int) -> str:
        return f"{self._dir('memories', run, run.memories)}/shard{shard}.safetensors"

    def trace_path(self, run: Run, shard: int) -> str:
        return f"{self._dir('memories', run, run.memories)}/shard{shard}.trace.parquet"

    def update_path(self, run: Run, shard: int) -> str:
        return f"{self._dir('updates', run, run.update)}/shard{shard}.parquet"

    def sequence_path(self, run: Run) -> str:
        """The chain index of a run's edit_sequence job (its ΔW files in the folder chain/ beside it)."""
        return f"{self._dir('sequences', run, run.sequence)}/chain.parquet"

    def generate_path(self, run: Run, shard: int) -> str:
        return f"{self._dir('generate', run, run.generate)}/shard{shard}.parquet"

    def score_paths(self, run: Run) -> dict:
        d = self._dir("score", run, run.score)
        return {"samples": f"{d}/samples.parquet", "summary": f"{d}/summary.parquet"}

    def locality_path(self, run: Run | None, model: Model | None = None) -> str:
        if run is None:  # the pre-edit model of `model`
            spec = self.pre_edit_locality[model.name]
            return f"{self.results}/locality/{model.name}/-/{PRE_EDIT}-{spec.identity}/locality.parquet"
        return f"{self._dir('locality', run, run.locality)}/locality.parquet"

    def layer_trace_dir(self, model: str, dataset: str) -> str:
        spec = self.layer_traces[(model, dataset)]
        return f"{self.results}/trace/{model}/{dataset}/trace-{spec.identity}"

    def shards(self, run: Run) -> range:
        """Generate shards of a run: the dataset's, or one (the requests edited so far) in a sequence."""
        return range(1) if run.sequence is not None else range(run.dataset.n_shards)

    # ------------------------------------------------------------------ the report (muke.workflow.report_spec)

    def report_inputs(self) -> dict[str, list[str]]:
        """Every file the report reads, for the rule's inputs (the spec names them again, labelled)."""
        return report_inputs(self)

    def report_spec(self, estimates: bool = False) -> str:
        """What the report stage reads, as JSON (muke.workflow.report_spec.report_spec)."""
        return report_spec(self, estimates)
