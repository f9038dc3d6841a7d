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

COLUMNS = ["model_state", "request_id", "task", "metric", "value", "stderr", "n"]
RETENTION_ANSWERS = "retention_answers.parquet"  # beside the output: per-question answers before / after


def _read_part(path: Path, identity: str) -> dict | None:
    """{rows, samples} of an edit this job finished earlier, else None."""
    if not path.is_file():
        return None
    part = json.loads(path.read_text())
    return part if part.get("identity") == identity else None


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
    edits (their sum, muke.update.sequential.chain_sum: the same up to fp32 rounding; model_state
    "edited", request_id null). Parquet rows: model_state, request_id, task, metric,
    value, stderr, n; the per-question
    answers go to retention_answers.parquet beside it."""
    import pandas as pd

    from muke.eval import retention
    from muke.eval.locality import aggregate, evaluate
    from muke.update.weights import WeightUpdate, apply

    p = spec["params"]
    em = load_model(model, p["dtype"], device)
    kwargs = dict(
        tasks=p["tasks"],
        include_path=p["include_path"],
        limit=p["limit"],
        num_fewshot=p["num_fewshot"],
        batch_size=p["batch_size"],
        gen_kwargs=p["gen_kwargs"],
    )
    ref = None
    if p.get("retention", {}).get("enabled"):
        log("answers of the unedited model to the unrelated questions (the retention reference)")
        ref = retention.reference(em, p["retention"])

    def lm_eval(state: str) -> list[dict]:
        return [{**r, "n": r["n_samples"]} for r in evaluate(em, model_state=state, **kwargs)] if p["tasks"] else []

    rows, samples = [], []
    if chain is not None:
        from muke.update.sequential import chain_sum

        files, _ = read_chain(chain, p["n_edits"])
        log(f"locality of the model edited in sequence by {p['n_edits']} edits ({len(files)} updates): {p['tasks']}")
        chained = chain_sum(WeightUpdate.load(f) for f in files)
        with apply(em, chained):
            rows = [{**r, "request_id": None} for r in lm_eval("edited")]
        found = retention.locality_rows(em, ref, "edited", None, chained) if ref else ([], [])
        rows, samples = rows + found[0], found[1]
    elif not p["edits"]:
        log(f"locality of the unedited model: {p['tasks']}")
        rows = [{**r, "request_id": None} for r in lm_eval("pre-edit")]
        found = retention.locality_rows(em, ref, "pre-edit") if ref else ([], [])
        rows, samples = rows + found[0], found[1]
    else:
        where = {rid: entry["path"] for u in updates for entry in read_update_index(u) for rid in entry["request_ids"]}
        parts = Path(out).with_name(Path(out).stem + ".parts")
        for i, rid in enumerate(p["edits"]):
            if where.get(rid) is None:
                log(f"request {rid}: no weight update (edit failed): skipped")
                continue
            part_path = parts / f"{i:05d}.json"
            part = _read_part(part_path, spec["identity"])
            if part is not None:
                log(f"locality of the model edited with {rid}: finished earlier (part file)")
            else:
                log(f"locality of the model edited with {rid}: {p['tasks']}{' + retention' if ref else ''}")
                update = WeightUpdate.load(where[rid])
                with apply(em, update):
                    part = {"rows": [{**r, "request_id": rid} for r in lm_eval("edited")], "samples": []}
                if ref:
                    found = retention.locality_rows(em, ref, "edited", rid, update)
                    part = {"rows": part["rows"] + found[0], "samples": found[1]}
                # key order kept (not write_json's sorted keys): the tables' columns follow the first row's keys
                write_text(part_path, json.dumps({"identity": spec["identity"], "request_id": rid, **part}))
            rows, samples = rows + part["rows"], samples + part["samples"]
        rows += [{**r, "request_id": None, "n": r["n_runs"]} for r in aggregate(rows, "edited")]
    if ref:
        write_parquet(pd.DataFrame(samples), Path(out).parent / RETENTION_ANSWERS)
    write_parquet(pd.DataFrame(rows, columns=COLUMNS)[COLUMNS], out)
    write_manifest(Path(out).parent / "manifest.json", spec)
    shutil.rmtree(Path(out).with_name(Path(out).stem + ".parts"), ignore_errors=True)
    return Path(out)
