"""locality: general-ability scores (lm-eval, muke.eval.locality) of the unedited or the edited models."""

from __future__ import annotations

from pathlib import Path

from muke.io import write_parquet
from muke.workflow.stages.command import command
from muke.workflow.stages.common import load_model, log, read_update_index, write_manifest

COLUMNS = ["model_state", "request_id", "task", "metric", "value", "stderr", "n"]


@command("lm-eval locality of the unedited or edited models", updates="update_weights indexes of the run's shards")
def locality(spec: dict, model: str | Path, out: str | Path, updates: list[str | Path] = (),
             device: str = "auto") -> Path:
    """General-ability locality (lm-eval) of the unedited model (no edits in the spec) or of the edited
    model of each request in the spec's `edits`, then their mean ± standard error (model_state
    "edited", request_id null). Parquet rows: model_state, request_id, task, metric, value, stderr, n."""
    import pandas as pd

    from muke.eval.locality import aggregate, evaluate
    from muke.update.weights import WeightUpdate, apply

    p = spec["params"]
    em = load_model(model, p["dtype"], device)
    kwargs = dict(tasks=p["tasks"], include_path=p["include_path"], limit=p["limit"], num_fewshot=p["num_fewshot"],
                  batch_size=p["batch_size"], gen_kwargs=p["gen_kwargs"])
    if not p["edits"]:
        log(f"locality of the unedited model: {p['tasks']}")
        rows = [{**r, "request_id": None, "n": r["n_samples"]} for r in evaluate(em, model_state="pre-edit", **kwargs)]
    else:
        where = {rid: entry["path"] for u in updates for entry in read_update_index(u) for rid in entry["request_ids"]}
        runs = []
        for rid in p["edits"]:
            if where.get(rid) is None:
                log(f"request {rid}: no weight update (edit failed): skipped")
                continue
            log(f"locality of the model edited with {rid}: {p['tasks']}")
            with apply(em, WeightUpdate.load(where[rid])):
                runs += [{**r, "request_id": rid} for r in evaluate(em, model_state="edited", **kwargs)]
        rows = [{**r, "n": r["n_samples"]} for r in runs]
        rows += [{**r, "request_id": None, "n": r["n_runs"]} for r in aggregate(runs, "edited")]
    write_parquet(pd.DataFrame(rows, columns=COLUMNS)[COLUMNS], out)
    write_manifest(Path(out).parent / "manifest.json", spec)
    return Path(out)
