"""locality: general-ability scores (lm-eval, muke.eval.locality) and answer / text retention
(muke.eval.retention) of the unedited or the edited models.

Each edited model's rows are kept in a part file tagged with the job's identity as soon as its
evaluation ends (as optimize_memories keeps each request's), so a job killed by a time limit resumes
after the edits it finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from muke.io import write_parquet, write_text
from muke.workflow.stages.command import command
from muke.workflow.stages.common import load_model, log, read_chain, read_update_index, write_manifest
from muke.workflow.stages.generate import parts_dir, read_part

COLUMNS = ["model_state", "request_id", "task", "metric", "value", "stderr", "n_samples", "n_models"]
RETENTION_ANSWERS = "retention_answers.parquet"  # beside the output: per-question answers before / after
LM_EVAL_OPTIONS = ("tasks", "include_path", "limit", "num_fewshot", "batch_size", "gen_kwargs")


@command(
    "lm-eval locality of the unedited or edited models",
    updates="update_weights indexes of the run's shards",
    chain="edit_sequence chain index: the model edited by its first n_edits edits",
)
def locality(
    spec: dict,
    model: str | Path,
    out: str | Path,
    updates: list[str | Path] = (),
    device: str = "auto",
    chain: str | Path | None = None,
) -> Path:
    """General-ability locality (lm-eval `tasks`) and, with `retention.enabled`, answer retention and text
    shift (muke.eval.retention) of the unedited model (no edits in the spec) or of the edited model of each
    request in the spec's `edits`, then their mean ± standard error (model_state "edited", request_id
    null), or with `chain` (editing.mode sequential) of the one model edited by the chain's first n_edits
    edits (their sum, muke.update.weights.chain_sum: the same up to fp32 rounding; model_state
    "edited", request_id null). Parquet rows: model_state, request_id, task, metric, value, stderr,
    n_samples (the questions, or tokens for a per-token metric, that one model's value averages), n_models
    (the edited models a mean row averages, one per edit; 1 on the others); the per-question answers go to
    retention_answers.parquet beside it."""
    import pandas as pd

    from muke.eval import retention

    p, out = spec["params"], Path(out)
    em = load_model(model, p["dtype"], device)
    ref = None
    if p.get("retention", {}).get("enabled"):
        log("answers of the unedited model to the unrelated questions (the retention reference)")
        ref = retention.reference(em, p["retention"])
    if chain is not None:
        rows, samples = _chained(em, p, ref, chain)
    elif not p["edits"]:
        log(f"locality of the unedited model: {p['tasks']}")
        rows, samples = _model_rows(em, p, ref, "pre-edit")
    else:
        rows, samples = _each_edit(em, p, ref, updates, out, spec["identity"])
    if ref:
        write_parquet(pd.DataFrame(samples), out.parent / RETENTION_ANSWERS)
    write_parquet(pd.DataFrame(rows, columns=COLUMNS)[COLUMNS], out)
    write_manifest(out.parent / "manifest.json", spec)
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    return out


def _model_rows(em, p: dict, ref, state: str, request_id: str | None = None, update=None) -> tuple[list, list]:
    """(rows, retention samples) of one model: `em` as it is, or with `update` (ΔW) applied."""
    from muke.eval import retention
    from muke.eval.locality import evaluate
    from muke.update.weights import apply

    rows = []
    if p["tasks"]:
        with apply(em, [] if update is None else update):
            rows = evaluate(em, model_state=state, **{key: p[key] for key in LM_EVAL_OPTIONS})
    found, samples = retention.locality_rows(em, ref, state, request_id, update) if ref else ([], [])
    return [{**r, "request_id": request_id, "n_models": 1} for r in rows + found], samples


def _chained(em, p: dict, ref, chain: str | Path) -> tuple[list, list]:
    """(rows, samples) of the model edited by the chain's first n_edits edits (their sum)."""
    from muke.update.weights import WeightUpdate, chain_sum

    files, _ = read_chain(chain, p["n_edits"])
    log(f"locality of the model edited in sequence by {p['n_edits']} edits ({len(files)} updates): {p['tasks']}")
    return _model_rows(em, p, ref, "edited", update=chain_sum(WeightUpdate.load(f) for f in files))


def _each_edit(em, p: dict, ref, updates, out: Path, identity: str) -> tuple[list, list]:
    """(rows, samples) of the model edited with each request of the spec's `edits` (its ΔW alone; a
    failed edit skipped), then their mean ± standard error. An edit's rows are kept in a part file."""
    from muke.eval.locality import aggregate

    where = {rid: entry["path"] for u in updates for entry in read_update_index(u) for rid in entry["request_ids"]}
    rows, samples = [], []
    for i, rid in enumerate(p["edits"]):
        if where.get(rid) is None:
            log(f"request {rid}: no weight update (edit failed): skipped")
            continue
        part = _edit_part(em, p, ref, rid, where[rid], parts_dir(out) / f"{i:05d}.json", identity)
        rows, samples = rows + part["rows"], samples + part["samples"]
    return rows + [{**r, "request_id": None} for r in aggregate(rows, "edited")], samples


def _edit_part(em, p: dict, ref, rid: str, update_path: str, path: Path, identity: str) -> dict:
    """{rows, samples} of the model edited with request `rid`: from its part file `path` where a job of
    this identity finished it earlier, else evaluated and kept there."""
    from muke.update.weights import WeightUpdate

    found = read_part(path, identity)
    if found is not None:
        log(f"locality of the model edited with {rid}: finished earlier (part file)")
        return found
    log(f"locality of the model edited with {rid}: {p['tasks']}{' + retention' if ref else ''}")
    rows, samples = _model_rows(em, p, ref, "edited", rid, WeightUpdate.load(update_path))
    # key order kept (not write_json's sorted keys): the tables' columns follow the first row's keys
    write_text(path, json.dumps({"identity": identity, "request_id": rid, "rows": rows, "samples": samples}))
    return {"rows": rows, "samples": samples}
