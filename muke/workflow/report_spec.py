"""What the report stage reads: every run of the plan with its labels, result files and stage identities.

The report is not hashed: it gathers the runs of the current config, and its labels say which run is
which (model, dataset, method, setting; with a one-key sweep sweep_param / sweep_value name the point).
"""

from __future__ import annotations

import json
from pathlib import Path

from muke.update.backends import BACKENDS
from muke.workflow.job_costs import job_memory
from muke.workflow.runs import PRE_EDIT


def _run_files(plan, run) -> dict:
    """A run's result files; its shards' δ memories and traces are None where its method has none (ft, lora); a
    sequential run's chain index and the number of edits it was evaluated after (`chain`, `n_edits`)."""
    memories = run.memories is not None
    shards = [
        {
            "memories": plan.memories_path(run, k) if memories else None,
            "trace": plan.trace_path(run, k) if memories else None,
            "update": plan.update_path(run, k),
        }
        for k in (plan.shards(run) if run.update is not None else ())
    ]
    chain = {"chain": plan.sequence_path(run), "n_edits": run.n_edits} if run.sequence is not None else {}
    return {
        **plan.score_paths(run),
        "locality": plan.locality_path(run) if run.locality else None,
        "shards": shards,
        **chain,
    }


def _manifests(plan, run) -> dict[str, str]:
    """{stage: manifest.json} of each job of a run (a stage's shards share one: the last writes it)."""
    paths = {
        "collect_stats": run.stats and Path(plan.stats_path(run.model, run.stats)).with_suffix(".manifest.json"),
        "optimize_memories": run.memories and Path(plan.memories_path(run, 0)).parent / "manifest.json",
        "update_weights": run.update and Path(plan.update_path(run, 0)).parent / "manifest.json",
        "generate": Path(plan.generate_path(run, 0)).parent / "manifest.json",
        "locality": run.locality and Path(plan.locality_path(run)).parent / "manifest.json",
    }
    return {stage: str(path) for stage, path in paths.items() if path}


def _report_run(plan, run) -> dict:
    """One run's labels, files, stage identities, job manifests and the settings it ran with (every
    δ-loop option, e.g. the λ order, and the generation settings, e.g. the decoding protocol)."""
    ((param, value),) = run.setting.items() if len(run.setting) == 1 else [(None, None)]
    identities = {"prepare_model": run.model.spec.identity, **{s.stage: s.identity for s in run.specs().values()}}
    settings = {"generation": run.generate.params["generation"]}
    if run.memories is not None:
        settings["memory"] = run.memories.params["memory"]
    return {
        "model": run.model.name,
        "dataset": run.dataset.name,
        "method": run.method,
        "setting": json.dumps(run.setting, sort_keys=True) if run.setting else "",
        "sweep_param": param,
        "sweep_value": None if param is None else json.dumps(value),
        "files": _run_files(plan, run),
        "identities": identities,
        "manifests": _manifests(plan, run),
        "settings": settings,
    }


def _report_pre_edit_locality(plan, name: str) -> dict:
    model = plan.models[name]
    return {
        "model": name,
        "dataset": "",
        "method": PRE_EDIT,
        "setting": "",
        "sweep_param": None,
        "sweep_value": None,
        "files": {"summary": None, "samples": None, "shards": [], "locality": plan.locality_path(None, model)},
        "identities": {"prepare_model": model.spec.identity, "locality": plan.pre_edit_locality[name].identity},
        "manifests": {"locality": str(Path(plan.locality_path(None, model)).parent / "manifest.json")},
        "settings": {},
    }


def report_runs(plan) -> list[dict]:
    return [_report_run(plan, r) for r in plan.runs] + [
        _report_pre_edit_locality(plan, m) for m in plan.pre_edit_locality
    ]


def data_files(plan) -> list[str]:
    """The data files the results depend on, for the report's checksums: edit requests, statistics
    corpora, UnKE preservation samples, tiny-model corpora, locality tasks and their data."""
    files = [d.path for d in plan.datasets.values()]
    files += [
        m.spec.params["tiny"]["corpus"]
        for m in plan.models.values()
        if m.spec.params["source"] == "tiny" and m.spec.params["tiny"]["corpus"]
    ]
    for run in plan.runs:
        if run.stats is not None and not plan.stats_corpus(run.stats).startswith("hf:"):
            files.append(plan.stats_corpus(run.stats))
        if run.update is not None and BACKENDS[run.update.params["backend"]].preservation:
            files.append(plan.preservation_path(run))
    loc = plan.config["locality"]
    if loc["enabled"]:
        files += [p for p in [loc["include_path"], *loc["data"]] if p]
    return list(dict.fromkeys(files))


def report_inputs(plan) -> dict[str, list[str]]:
    """Every file the report reads, for the rule's inputs (the spec names them again, labelled)."""
    runs = report_runs(plan)
    shards = [s for r in runs for s in r["files"]["shards"]]
    files = {
        "summaries": [r["files"]["summary"] for r in runs],
        "samples": [r["files"]["samples"] for r in runs],
        "localities": [r["files"]["locality"] for r in runs],
        "memories": [s["memories"] for s in shards],
        "traces": [s["trace"] for s in shards],
        "updates": [s["update"] for s in shards],
        "chains": [r["files"].get("chain") for r in runs],
        "layer_traces": [t["path"] for t in layer_traces(plan)],
    }
    return {kind: list(dict.fromkeys(p for p in paths if p)) for kind, paths in files.items()}


def layer_traces(plan) -> list[dict]:
    """The trace_layers folders of the plan, labelled by model and dataset."""
    return [
        {"model": model, "dataset": dataset, "path": plan.layer_trace_dir(model, dataset)}
        for model, dataset in plan.layer_traces
    ]


def memory_estimates(plan) -> list[dict]:
    """muke estimate's peak memory of each job (muke.workflow.job_costs.job_memory); none where a model's
    widths are unknown (a hub id that muke estimate does not know)."""
    try:
        return job_memory(plan)
    except ValueError:
        return []


def report_spec(plan, estimates: bool = False) -> str:
    """JSON for the report stage (muke.workflow.stages.report): the resolved config, every run with
    its labels, result files and stage identities, the data files to checksum, the datasets (for
    request categories) and the Snakemake benchmarks folder. With `estimates`, muke estimate's peak
    memory of each job (`memory_estimates`): it reads the prepared models' widths, so the report rule
    adds it when it runs, outside the spec that decides whether the report reruns."""
    return json.dumps(
        {
            "title": plan.config["report"]["title"],
            "config": plan.config,
            "runs": report_runs(plan),
            "data_files": data_files(plan),
            "datasets": {d.name: {"path": d.path, "format": d.format} for d in plan.datasets.values()},
            "benchmarks": f"{plan.results}/benchmarks",
            "layer_traces": layer_traces(plan),
            "memory_estimates": memory_estimates(plan) if estimates else [],
        },
        sort_keys=True,
        default=str,
    )
