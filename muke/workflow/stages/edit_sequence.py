"""edit_sequence: the requests edited batch after batch into one model (editing.mode sequential,
muke.update.sequential), written as the chain of weight updates ΔW_1 .. ΔW_T.

Each batch's ΔW is written, tagged with the job's identity, as soon as it is made: a killed job replays
the finished batches (their ΔW and, for AlphaEdit and preserve_earlier, their keys; with resolve_every or
recheck_earlier, their target memories z, written beside as {t:04d}.z.safetensors) and goes on after the last,
so it ends with the chain an uninterrupted job writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from muke.io import record_sha256, sha256, write_json, write_parquet, write_safetensors
from muke.workflow.stages.command import command
from muke.workflow.stages.common import log, shard_requests, unsettled_cell, write_manifest
from muke.workflow.stages.optimize_memories import fit_for_model

# sha256 of `file`; unsettled: as in the update_weights index (the re-solve's: every request it re-solved)
CHAIN_COLUMNS = ["batch", "file", "request_ids", "n_edits", "failed", "seconds", "reason", "sha256", "unsettled"]


def _finished(folder: Path, t: int, identity: str, ids: list[str]):
    """The WeightUpdate, or the failure reason (str), of batch t written earlier by this job; else None."""
    from muke.update.weights import WeightUpdate

    path, failed = folder / f"{t:04d}.safetensors", folder / f"{t:04d}.failed.json"
    if path.is_file():
        update = WeightUpdate.load(path)
        if update.info.get("identity") == identity and update.request_ids == ids:
            return update
    if failed.is_file():
        record = json.loads(failed.read_text())
        if record.get("identity") == identity and record.get("request_ids") == ids:
            return record["reason"]
    return None


def _write_targets(folder: Path, t: int, ids: list[str], results: list) -> None:
    """Batch t's target memories z, one tensor per request (resolve_every re-solves with them, recheck_earlier
    re-checks their requests)."""
    write_safetensors(
        folder / f"{t:04d}.z.safetensors",
        {str(i): r.z for i, r in enumerate(results)},
        {"request_ids": json.dumps(ids)},
    )


def _written_targets(editor, folder: Path, t: int, batch: list) -> list | None:
    """The targets of batch t that this job wrote, for the editor to replay (None: it keeps none)."""
    from safetensors import safe_open

    if editor.targets is None:
        return None
    path, ids = folder / f"{t:04d}.z.safetensors", [r.id for r in batch]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the target memories of batch {t}, kept for resolve_every / recheck_earlier")
    with safe_open(str(path), framework="pt") as f:
        if json.loads(f.metadata()["request_ids"]) != ids:
            raise ValueError(f"{path}: target memories of other requests than batch {t}'s {ids}")
        return editor.targets_of(batch, [f.get_tensor(str(i)) for i in range(len(batch))])


def _edit_batch(editor, folder: Path, t: int, batch: list, identity: str, resuming: bool) -> tuple:
    """(the WeightUpdate of batch t or why it failed, whether this job wrote it earlier): while the job
    resumes, replayed from its files; else edited into the model and written at once."""
    from muke.numerics import NumericalError

    ids = [r.id for r in batch]
    done = _finished(folder, t, identity, ids) if resuming else None
    if isinstance(done, str):
        log(f"batch {t}: failed earlier ({done})")
        return done, True
    if done is not None:
        log(f"batch {t}: finished earlier, replayed ({ids})")
        editor.replay(done, _written_targets(editor, folder, t, batch))
        return done, True
    log(f"batch {t}: editing {ids} into the model edited with {editor.n_batches} batches")
    try:
        done, results = editor.edit(batch)
    except NumericalError as e:
        log(f"batch {t}: failed ({e})")
        write_json(folder / f"{t:04d}.failed.json", {"identity": identity, "request_ids": ids, "reason": str(e)})
        return str(e), False
    if editor.targets is not None:
        _write_targets(folder, t, ids, results)
    done.info["identity"] = identity
    done.save(folder / f"{t:04d}.safetensors")
    return done, False


def _chain_row(t: int, ids: list[str], n_edits: int, done) -> dict:
    failed = isinstance(done, str)
    return {
        "batch": t,
        "file": None if failed else f"{t:04d}.safetensors",
        "request_ids": json.dumps(ids),
        "n_edits": n_edits,
        "failed": failed,
        "seconds": 0.0 if failed else done.info["seconds"] + done.info.get("memory_seconds", 0.0),
        "reason": done if failed else None,
        "unsettled": None if failed else unsettled_cell(f"batch {t}", done.info),
    }


@command(
    "edits made one after another into one model (editing.mode sequential)",
    cache_dir="AlphaEdit null-space projectors",
)
def edit_sequence(
    spec: dict,
    model: str | Path,
    requests: str | Path,
    out: str | Path,
    *,
    stats: str | Path | None = None,
    preservation: str | Path | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
) -> Path:
    """The chain of weight updates of editing the selected requests in batches of `batch_size`, batch t
    on the model as batches < t left it (target memories z re-optimised and keys read on the edited weights);
    the spec's preserve_earlier, weight_growth, resolve_every, recheck_earlier (where set) go to the SequentialEditor.

    `out` (Parquet, one row per batch): batch, file, request_ids (JSON list), n_edits (requests edited up to
    and including this batch), failed, seconds, reason, sha256, unsettled (edit passes: JSON of the windows the
    model does not yet reproduce after the last pass, muke.update.edit.further_passes); the WeightUpdate files
    lie in the folder named like `out` without its suffix. A batch whose δ or ΔW is not finite (NumericalError)
    gets a failed row, leaves the model as it was and the sequence goes on.
    """
    import pandas as pd

    from muke.engine.memory import MemoryConfig
    from muke.update.memories import batches_of
    from muke.update.sequential import SEQUENCE_OPTIONS, SequentialEditor
    from muke.workflow.stages.update_weights import set_up

    p, out = spec["params"], Path(out)
    em, options, loaded = set_up(spec, model, device, stats, preservation, cache_dir)
    cfg = MemoryConfig(**p["memory"])
    chosen = shard_requests(requests, p["selection"], 0)
    chosen, _ = fit_for_model(chosen, em, cfg, requests, p["selection"].get("on_bad_record", "error"))
    folder, rows, n_edits, resuming = out.with_suffix(""), [], 0, True
    resolved, sequence = (p["memory"], p["backend"], options), {k: p[k] for k in SEQUENCE_OPTIONS if k in p}
    with SequentialEditor(em, p["method"], stats=loaded, resolved=resolved, **sequence) as editor:
        for t, batch in enumerate(batches_of(chosen, p["batch_size"])):
            done, resuming = _edit_batch(editor, folder, t, batch, spec["identity"], resuming)
            n_edits += len(batch)
            row = _chain_row(t, [r.id for r in batch], n_edits, done)
            rows.append({**row, "sha256": None if row["failed"] else sha256(folder / row["file"])})
    strings = {"file": "string", "reason": "string", "sha256": "string", "unsettled": "string"}
    frame = pd.DataFrame(rows, columns=CHAIN_COLUMNS).astype(strings)
    write_parquet(frame, out)
    record_sha256(out)
    write_manifest(out.parent / "manifest.json", spec)
    return out
