"""collect_stats: second moments of the down_proj inputs of the edited layers (muke.update.stats).

With a statistics store (config `runtime.stats_store`, a folder outside any one results folder) the sums
live there under the job's identity — the model's, the layers, the corpus by content, the sample count,
maximum length, dtype and the statistics code — and the job's output is a hard link to that file (a copy
across file systems). A second experiment on the same model and settings, whatever its results folder,
finds the file and computes nothing; a killed job resumes from the store's checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from muke.io import link_or_copy
from muke.workflow.stages.command import command
from muke.workflow.stages.common import load_model, log, write_manifest


def stored_path(store: str | Path, spec: dict) -> Path:
    """The store's file of a statistics job: one per identity (`spec` names layers and model by identity)."""
    layers = "-".join(map(str, spec["params"]["layers"]))
    return Path(store) / f"stats-L{layers}-{spec['identity']}.safetensors"


@command(
    "second moments of the down_proj inputs",
    corpus="text corpus file, or hf:NAME",
    store="statistics store shared across experiments (runtime.stats_store)",
)
def collect_stats(
    spec: dict,
    model: str | Path,
    corpus: str,
    out: str | Path,
    *,
    device: str = "auto",
    checkpoint_every: int = 1000,
    store: str | Path | None = None,
) -> Path:
    """Second moments of the down_proj inputs of the spec's layers (resumes from `out`.partial), or with
    `store` the store's file of this job, collected there first if it is not."""
    from muke.update import stats

    out = Path(out)
    target = stored_path(store, spec) if store else out
    if store and target.is_file():
        log(f"statistics of job {spec['identity']} found in the store: {target}")
    else:
        p = spec["params"]
        em = load_model(model, p["dtype"], device)
        cfg = stats.StatsConfig(
            layers=tuple(p["layers"]),
            corpus=corpus,
            max_docs=p["max_docs"],
            max_length=p["max_length"],
            seed=p["seed"],
            text_field=p["text_field"],
            batch_tokens=p["batch_tokens"],
            chat=p.get("chat", False),
            checkpoint_every=checkpoint_every,
            extra={"identity": spec["identity"]},
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        stats.collect_stats(em, cfg, target, progress=False)
    if target != out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.link")
        tmp.unlink(missing_ok=True)
        link_or_copy(target, tmp)
        os.replace(tmp, out)
    write_manifest(out.with_name(out.stem + ".manifest.json"), spec)
    return out
