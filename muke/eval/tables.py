"""The report's tables, assembled from the result files of labelled runs.

A run is a dict: its labels (model, dataset, method, setting, sweep_param, sweep_value), `files`
(summary, samples, locality: Parquet paths or None; shards: [{memories, trace, update}]),
`identities` ({stage: identity}) and optionally `manifests` ({stage: manifest.json}) and `settings`
({"memory": δ-loop options, "generation": generation settings}). Every row of a table carries its run's labels and `run`, the name
of the folder its file lies in. Nothing here knows how the files were made or scheduled.
"""

from __future__ import annotations

import json
from pathlib import Path

from muke.eval.fluency import FLUENCY_COLUMNS  # the answers' fluency beside their targets'

LABELS = ["model", "dataset", "method", "setting", "sweep_param", "sweep_value"]
METRICS = ["bleu", "rouge_l", "bertscore"]
# each metric's 95 % bootstrap interval over requests (muke.eval.intervals, the score stage's summary)
INTERVAL_COLUMNS = [f"{m}_ci_{side}" for m in METRICS for side in ("low", "high")]
EDIT_COLUMNS = ["kind", "family", *METRICS, *INTERVAL_COLUMNS, *FLUENCY_COLUMNS, "n", "n_samples", "edit_failed", "run"]
LOCALITY_COLUMNS = ["model_state", "request_id", "task", "metric", "value", "stderr", "n_samples", "n_models", "run"]
SAMPLE_COLUMNS = ["id", "kind", "index", "family", *METRICS, *FLUENCY_COLUMNS, "target_tokens", "tokens", "edit_failed"]
CASE_COLUMNS = ["id", "kind", "index", "output", "target"]
UNRELATED = "unrelated"  # case_rows' kind of the unrelated prompts' answers (muke.eval.case_study)
UNRELATED_COLUMNS = ["id", "kind", "prompt_id", "prompt_kind", "question", "pre", "output"]
# the locality stage's per-prompt answers beside its output (muke.workflow.stages.locality.RETENTION_ANSWERS)
RETENTION_ANSWERS = "retention_answers.parquet"
FAILURE_COLUMNS = ["id", "stage", "reason", *LABELS, "run", "record"]
UNSETTLED_COLUMNS = ["id", "off_target_windows", "short_windows", "batch", *LABELS, "run"]


def _label(run: dict) -> dict:
    return {k: run[k] for k in LABELS}


def labelled(runs: list[dict], files) -> list[tuple[str, dict]]:
    """(path, label) of each distinct file that `files(run)` names. A file that several runs share
    (the δ shards of a sweep over an update setting) gets their differing label values joined by ' | '."""
    found: dict[str, list[dict]] = {}
    for run in runs:
        for path in files(run):
            found.setdefault(path, []).append(_label(run))
    out = []
    for path, labels in found.items():
        label = {
            k: labels[0][k]
            if len({json.dumps(lab[k]) for lab in labels}) == 1
            else " | ".join(dict.fromkeys(str(lab[k]) for lab in labels))
            for k in LABELS
        }
        out.append((path, label))
    return out


def run_file(kind: str):
    """`files` of `labelled`: a run's one file of `kind` (summary, samples, locality), if it has one."""
    return lambda run: [run["files"][kind]] if run["files"][kind] else []


def read_labelled(runs: list[dict], files, columns: list[str] | None = None):
    """The files concatenated, each row labelled with its run and `run` = its folder; None without files."""
    import pandas as pd
    import pyarrow.parquet as pq

    frames = []
    for path, label in labelled(runs, files):
        names = None if columns is None else [c for c in columns if c in pq.read_schema(path).names]
        frames.append(pd.read_parquet(path, columns=names).assign(**label, run=Path(path).parent.name))
    return pd.concat(frames, ignore_index=True) if frames else None


def edit_metrics(runs: list[dict]):
    """One row per run × question kind × metric family (the score summaries); interval and fluency
    columns a summary lacks (one written before they existed) are empty."""
    import pandas as pd

    edit = read_labelled(runs, run_file("summary"))
    return pd.DataFrame(columns=LABELS + EDIT_COLUMNS) if edit is None else edit.reindex(columns=LABELS + EDIT_COLUMNS)


def locality(runs: list[dict]):
    """One row per run's model state × task × metric: the pre-edit model and the mean over edited models;
    count columns a locality file lacks (one written before n_samples / n_models) are empty."""
    import pandas as pd

    loc = read_labelled(runs, run_file("locality"))
    loc = pd.DataFrame(columns=LABELS + LOCALITY_COLUMNS) if loc is None else loc
    loc = loc[loc["request_id"].isna()]
    return loc.reindex(columns=LABELS + [c for c in LOCALITY_COLUMNS if c != "request_id"]).reset_index(drop=True)


def _requests(datasets: dict):
    """(dataset name, request) of every readable record. `datasets`: {name: {"path", "format"}}."""
    from muke.data import load_requests_checked

    return [
        (name, r)
        for name, d in datasets.items()
        for r in load_requests_checked(d["path"], d["format"], on_bad_record="skip")[0]
    ]


def categories(datasets: dict):
    """(dataset, id, category) of the requests that have a category (EditEverything), else None."""
    import pandas as pd

    rows = [{"dataset": name, "id": r.id, "category": r.category} for name, r in _requests(datasets) if r.category]
    return pd.DataFrame(rows) if rows else None


def _retention_answers(run: dict) -> list[str]:
    """The per-prompt retention answers beside a run's locality file, if it wrote them: [path] or []."""
    path = run["files"]["locality"] and Path(run["files"]["locality"]).parent / RETENTION_ANSWERS
    return [str(path)] if path and path.is_file() else []


def unrelated_rows(runs: list[dict]):
    """Each edited model's answers to the unrelated prompts (the locality stage's retention answers of a
    model edited with one request), one row per run × request × prompt in UNRELATED_COLUMNS' terms:
    kind "unrelated", id the edited request, question the prompt, pre the unedited model's answer,
    output the edited model's; None where no run has them. Unlike `read_labelled`, each run reads the file
    itself (runs that differ only after locality, e.g. in decoding, share it) and `run` names its samples'
    folder, so that the rows carry the labels of the run's question answers (case_rows)."""
    import pandas as pd

    frames = [
        pd.read_parquet(path).assign(**_label(run), run=Path(run["files"]["samples"] or path).parent.name)
        for run in runs
        for path in _retention_answers(run)
    ]
    if not frames:
        return None
    answers = pd.concat(frames, ignore_index=True)
    answers = answers[(answers["model_state"] == "edited") & answers["request_id"].notna()]
    answers = answers.rename(columns={"id": "prompt_id", "kind": "prompt_kind", "post": "output"})
    return answers.assign(id=answers["request_id"], kind=UNRELATED)[LABELS + ["run", *UNRELATED_COLUMNS]]


def case_rows(runs: list[dict], datasets: dict):
    """Each run's answer to each original question (one metric family's copy), with the question
    text from the dataset file ("—" where the record is gone) and the target, followed by the
    `unrelated_rows`; None without samples."""
    import pandas as pd

    samples = read_labelled(runs, run_file("samples"), CASE_COLUMNS)
    if samples is None:
        return None
    samples = samples[samples["kind"] == "question"].drop_duplicates(["run", "id", "index"])
    questions = pd.DataFrame(
        [{"dataset": name, "id": r.id, "question": r.question} for name, r in _requests(datasets)],
        columns=["dataset", "id", "question"],
    )
    rows = samples.merge(questions.drop_duplicates(["dataset", "id"]), on=["dataset", "id"], how="left")
    rows = rows.fillna({"question": "—"})
    return pd.concat([rows, unrelated_rows(runs)], ignore_index=True)


def per_sample(runs: list[dict], datasets: dict):
    """Every scored answer of every run, with its request's category where the dataset has them."""
    samples = read_labelled(runs, run_file("samples"), SAMPLE_COLUMNS)
    found = categories(datasets)
    if samples is not None and found is not None:
        samples = samples.merge(found, on=["dataset", "id"], how="left")
    return samples


def traces(runs: list[dict]):
    """The δ-loss traces (id, window, step, loss) of every shard that has them."""
    return read_labelled(runs, lambda r: [s["trace"] for s in r["files"]["shards"] if s["trace"]])


def _shard_failures(label: dict, shard: dict, memories_meta: dict, update_rows: list[dict]) -> list[dict]:
    where = {"run": Path(shard["memories"] or shard["update"]).parent.name, **label}
    lost = [
        {
            "id": s["id"],
            "stage": "data" if s["check"] == "file" else "optimize_memories",
            "reason": f"skipped: {s['message']}",
            "record": s["record"],
        }
        for s in memories_meta.get("skipped", [])
    ]
    lost += [
        {"id": r["id"], "stage": "optimize_memories", "reason": r["error"]}
        for r in memories_meta["requests"]
        if r["failed"]
    ]
    known = {row["id"] for row in lost}
    return [{**row, **where} for row in lost] + [
        {
            "id": rid,
            "stage": "update_weights",
            "reason": row["reason"],
            **label,
            "run": Path(shard["update"]).parent.name,
        }
        for row in update_rows
        if row["failed"]
        for rid in row["request_ids"]
        if rid not in known
    ]


def failures(runs: list[dict], read_shard):
    """Requests each run lost: records left out (memories shard `skipped`: unreadable, stage "data", or
    unfit for the model), δ optimisation failures (shard records, with the error) and updates that
    failed for another reason (update index rows, with theirs). `read_shard(shard)`: (the memories
    file's metadata, the update index's rows with `request_ids` as lists) of one shard."""
    import pandas as pd

    rows = [
        row
        for run in runs
        for shard in run["files"]["shards"]
        for row in _shard_failures(_label(run), shard, *read_shard(shard))
    ]
    table = pd.DataFrame(rows, columns=FAILURE_COLUMNS)
    return table.dropna(axis=1, how="all") if len(table) else table


def unsettled(runs: list[dict], read_shard, read_chain=None):
    """Requests whose edit passes ended with windows the edited model does not yet reproduce (the update index's
    or the edit_sequence chain's `unsettled`, muke.update.edit.further_passes): the windows where its greedy
    answer leaves the target (`off_target_windows`) and those below the stop probability (`short_windows`),
    JSON lists, and the chain's batch that left them so (a re-solve lists every request it re-solved); within
    one update, the requests that leave their target first. `read_shard`: as for `failures`;
    `read_chain(path, n_edits)`: the chain's {batch, unsettled} rows (muke.workflow.stages.common.chain_unsettled)."""
    import pandas as pd

    found = [
        (run, Path(shard["update"]).parent.name, None, row["unsettled"])
        for run in runs
        for shard in run["files"]["shards"]
        for row in read_shard(shard)[1]
    ]
    found += [
        (run, Path(run["files"]["chain"]).parent.name, row["batch"], row["unsettled"])
        for run in runs
        if read_chain is not None and run["files"].get("chain")
        for row in read_chain(run["files"]["chain"], run["files"]["n_edits"])
    ]
    rows = [
        {
            "id": rid,
            "off_target_windows": json.dumps(w["off_target"]),
            "short_windows": json.dumps(w["short"]),
            "batch": batch,
            **_label(run),
            "run": folder,
        }
        for run, folder, batch, short in found
        for rid, w in sorted((short or {}).items(), key=lambda item: not item[1]["off_target"])
    ]
    return pd.DataFrame(rows, columns=UNSETTLED_COLUMNS)


def stage_identities(runs: list[dict], stages) -> object:
    """One row per run: its labels and the identity of each of `stages` it ran (columns no run has dropped)."""
    import pandas as pd

    table = pd.DataFrame(
        [
            {
                **{k: r[k] for k in ("model", "dataset", "method", "setting")},
                **{stage: r["identities"].get(stage) for stage in stages},
            }
            for r in runs
        ]
    )
    return table.replace("", None).dropna(axis=1, how="all")


def _manifest(path: str) -> dict | None:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


HOST_FACTS = ["hostname", "gpus", "cuda available", "cuda (build)", "torch", "cudnn", "determinism"]


def job_hosts(runs: list[dict]):
    """Where each stage's jobs ran, from their manifests (the GPU nodes, not the host that builds the
    report): one row per stage × distinct host facts, with the number of job folders that report them.
    None when no run names a manifest that exists."""
    import pandas as pd

    rows = []
    for run in runs:
        for stage, path in run.get("manifests", {}).items():
            manifest = _manifest(path)
            if manifest and "host" in manifest:
                host = manifest["host"]
                rows.append({"stage": stage, **{k: str(host.get(k, "")) for k in HOST_FACTS}, "job": path})
    if not rows:
        return None
    df = pd.DataFrame(rows).drop_duplicates("job")
    return df.groupby(["stage", *HOST_FACTS], sort=True).size().rename("jobs").reset_index()


def run_settings(runs: list[dict]):
    """One row per run: its labels, every δ-loop option it ran with (λ order, affinity steps, clamp,
    weight decay, early stop...), its decoding protocol and, from its generate job's manifest, the
    effective decoding settings (the paper protocol's top_k / top_p / repetition_penalty come from the
    model's generation config). None without settings."""
    import pandas as pd

    rows = []
    for run in runs:
        if not run.get("settings"):
            continue
        generation = run["settings"]["generation"]
        manifest = _manifest(run.get("manifests", {}).get("generate", "")) or {}
        decoding = manifest.get("decoding") or {"protocol": generation.get("protocol", "greedy")}
        rows.append(
            {
                **{k: run[k] for k in ("model", "dataset", "method", "setting")},
                **run["settings"].get("memory", {}),
                "decoding": json.dumps(decoding, sort_keys=True),
                "max_new_tokens": generation.get("max_new_tokens"),
            }
        )
    # object columns: a run without a δ loop (pre-edit) must not turn the others' integers into floats
    return pd.DataFrame(rows, dtype=object).replace("", None).dropna(axis=1, how="all") if rows else None
