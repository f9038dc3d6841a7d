"""collect_stats: second moments of the down_proj inputs of the edited layers (muke.update.stats).

With a statistics store (config `runtime.stats_store`, a folder outside any one results folder) the sums
live there under the job's identity — the model's, the layers, the corpus by content, the sample count,
maximum length, dtype and the statistics code — and the job's output is a hard link to that file (a copy
across file systems). A second experiment on the same model and settings, whatever its results folder,
finds the file and computes nothing; a killed job resumes from the store's checkpoint. Jobs that need one
entry at once take its lock (muke.store): one computes, the others wait and link its file. The store's
file and the job's output have their sha256 recorded (NAME.sha256; the output's manifest too), and are
verified before use: a truncated or corrupted store entry is computed again.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from muke.io import checksum_path, link_or_copy, record_sha256, recorded_sha256, verify_sha256
from muke.workflow.stages.command import command
from muke.workflow.stages.common import load_model, log, write_manifest


def stored_path(store: str | Path, spec: dict) -> Path:
    """The store's file of a statistics job: one per identity (`spec` names layers and model by identity)."""
    layers = "-".join(map(str, spec["params"]["layers"]))
    return Path(store) / f"stats-L{layers}-{spec['identity']}.safetensors"


def _collect(spec: dict, model, corpus: str, device: str, checkpoint_every: int, target: Path) -> None:
    """Collect the spec's statistics into `target` (resuming target.partial)."""
    from muke.update import stats

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


def _link(target: Path, out: Path) -> None:
    """`out` as a hard link to the store's verified `target` (a copy across file systems)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.link")
    tmp.unlink(missing_ok=True)
    link_or_copy(target, tmp)
    verify_sha256(tmp, recorded_sha256(target), required=True, where=checksum_path(target).name)
    os.replace(tmp, out)


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
    `store` the store's file of this job, collected there first if it is not (by this job alone)."""
    from muke.store import complete_safetensors, ensure_entry

    out = Path(out)
    collect = partial(_collect, spec, model, corpus, device, checkpoint_every)
    if store:
        target = stored_path(store, spec)
        if not ensure_entry(target, collect, legacy=complete_safetensors):
            log(f"statistics of job {spec['identity']} found in the store: {target}")
        _link(target, out)
        digest = record_sha256(out, recorded_sha256(target))
    else:
        collect(out)
        digest = record_sha256(out)
    write_manifest(out.with_name(out.stem + ".manifest.json"), spec, sha256=digest)
    return out
