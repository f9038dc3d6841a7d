"""report: the tables (Parquet + CSV, muke.eval.tables) and the HTML report (muke.eval.report)."""

from __future__ import annotations

from pathlib import Path

from muke.io import atomic_path, write_parquet
from muke.workflow.identity import STAGES
from muke.workflow.stages.command import command
from muke.workflow.stages.common import chain_unsettled, log, read_memories_meta, read_update_index


def _read_shard(shard: dict) -> tuple[dict, list[dict]]:
    """(the memories file's metadata, none for a method without memories; the update index's rows)."""
    meta = read_memories_meta(shard["memories"]) if shard["memories"] else {"requests": [], "skipped": []}
    return meta, read_update_index(shard["update"])


@command(
    "tables and the HTML report",
    metrics="edit-metrics table (Parquet; a CSV beside it)",
    locality="locality table (Parquet; a CSV beside it)",
    html="the report page: a folder's index.html",
)
def report(spec: dict, metrics: str | Path, locality: str | Path, html: str | Path) -> Path:
    """The tables (Parquet + CSV) and the HTML report (muke.eval.report.build_report, which writes
    `index.html` and its tables as CSV into the folder of `html`).

    `spec` (muke.workflow.report_spec): the resolved config and every run with its labels (model,
    dataset, method, setting, sweep_param, sweep_value), result files and stage identities. The tables
    hold one row per run × question kind × metric family (edit metrics: means with their bootstrap
    intervals over requests, `{metric}_ci_low` / `_ci_high`) and per model state × task × metric
    (locality: the pre-edit model and the mean over edited models); `run` names the run's folder.
    """
    from muke.eval import tables
    from muke.eval.report import build_report

    html = Path(html)
    if html.name != "index.html":
        raise ValueError(f"--html must name an index.html file (the report folder's page), got {html}")
    runs = spec["runs"]
    edit, loc = tables.edit_metrics(runs), tables.locality(runs)
    for df, path in ((edit, metrics), (loc, locality)):
        write_parquet(df, path)
        with atomic_path(Path(path).with_suffix(".csv")) as tmp:
            df.to_csv(tmp, index=False)
    log(f"report of {len(runs)} runs: {len(edit)} edit-metric rows, {len(loc)} locality rows")
    return build_report(
        edit,
        loc,
        html.parent,
        config=spec["config"],
        stage_identities=tables.stage_identities(runs, STAGES),
        inputs=spec["data_files"],
        benchmarks_dir=spec["benchmarks"],
        benchmark_identities={i for r in runs for i in r["identities"].values()},
        traces=tables.traces(runs),
        failures=tables.failures(runs, _read_shard),
        unsettled=tables.unsettled(runs, _read_shard, chain_unsettled),
        per_sample=tables.per_sample(runs, spec["datasets"]),
        case_rows=tables.case_rows(runs, spec["datasets"]),
        jobs=tables.job_hosts(runs),
        run_settings=tables.run_settings(runs),
        memory_estimates=spec.get("memory_estimates", []),
        layer_traces=spec.get("layer_traces", []),
        title=spec["title"],
    )
