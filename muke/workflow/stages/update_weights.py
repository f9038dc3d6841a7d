"""update_weights: weight updates ΔW of a shard, one file per edit batch (muke.update.edit)."""

from __future__ import annotations

import json
from pathlib import Path

from muke.io import record_sha256, sha256, write_parquet
from muke.workflow.stages.command import command
from muke.workflow.stages.common import (
    check_layers,
    load_model,
    log,
    read_memories,
    shard_requests,
    unsettled_cell,
    write_manifest,
)

# sha256 of `file`; unsettled: JSON of muke.update.edit.further_passes' info["unsettled"] (None: one pass)
INDEX_COLUMNS = ["batch", "file", "request_ids", "failed", "seconds", "reason", "sha256", "unsettled"]


def targets(path: str | Path) -> tuple[list, list[tuple[str, str]]]:
    """(update.Target of each optimised request, (id, reason) of each failed or skipped request) of a
    memories shard."""
    from muke.update.keys import Target

    meta, t = read_memories(path)
    found = []
    failed = [(s["id"], f"skipped: {s['message']}") for s in meta.get("skipped", []) if s["check"] == "model"]
    for rec in meta["requests"]:
        if rec["failed"]:
            failed.append((rec["id"], rec.get("error") or "optimize_memories failed"))
            continue
        found.append(Target(rec["id"], _sequence(path, rec, t), t[f"{rec['index']}.z"]))
    return found, failed


def encoded(spec: dict, em, requests: str | Path, shard: int) -> tuple[list, list[tuple[str, str]]]:
    """(update.Target of each request of a shard, (id, reason) of each skipped one) for a backend without
    target memories (ft, lora): the shard's requests encoded on the spec's chat prompt (no z); a record
    left out for the file or the model gets a failed row, as the δ stage's skipped records do."""
    from muke.engine.memory import MemoryConfig
    from muke.update.edit import encoded_targets
    from muke.workflow.stages.optimize_memories import fit_for_model

    p, skipped = spec["params"], []
    chosen = shard_requests(requests, p["selection"], shard, skipped)
    cfg = MemoryConfig(**p["memory"])
    chosen, unfit = fit_for_model(chosen, em, cfg, requests, p["selection"].get("on_bad_record", "error"))
    failed = [(s["id"] or f"record {s['record']}", f"skipped: {s['message']}") for s in skipped + unfit]
    return encoded_targets(em, chosen, p["memory"]), failed


def _sequence(path, rec: dict, t: dict):
    """The EditSequence a request's memories were optimised on, with its other renderings; window 0's hook
    (key_position) from the stored positions."""
    from muke.engine.windows import EditSequence

    i = rec["index"]
    prompt_ids = tuple(t[f"{i}.prompt_ids"].tolist())
    positions = t[f"{i}.positions"].tolist()
    first = positions[0] if positions[0] != len(prompt_ids) - 1 else None
    target_ids, windows = tuple(t[f"{i}.target_ids"].tolist()), tuple(map(tuple, t[f"{i}.windows"].tolist()))
    renderings = tuple(
        EditSequence(
            o["prompt"], tuple(t[f"{i}.rendering{r}.prompt_ids"].tolist()), target_ids, windows, o["first_hook"]
        )
        for r, o in enumerate(rec.get("renderings", []))
    )
    seq = EditSequence(rec["prompt"], prompt_ids, target_ids, windows, first, renderings)
    if seq.hook_positions != positions:
        raise ValueError(f"{path}: request {rec['id']!r}: stored positions {positions} do not match its windows")
    return seq


def load_statistics(spec: dict, stats: str | Path | None, em, layers: list[int]):
    """The second moments a backend that reads them needs, refused when another statistics job wrote them."""
    from muke.update.backends import BACKENDS
    from muke.update.stats import StatsError, load_stats

    if not BACKENDS[spec["params"]["backend"]].stats:
        return None
    loaded = load_stats(stats, em, layers)
    expected = spec.get("inputs", {}).get("stats")
    if expected and loaded.meta.get("identity", expected) != expected:
        m = loaded.meta
        raise StatsError(
            f"{stats}: statistics were collected by another statistics job ({m.get('identity')}: corpus "
            f"{m.get('corpus')!r} sha256 {str(m.get('corpus_sha256'))[:12]}, {m.get('n_documents')} "
            f"documents, max_length {m.get('max_length')}); this update needs job {expected}"
        )
    return loaded


def set_up(spec: dict, model, device: str, stats, preservation, cache_dir) -> tuple:
    """(model, backend options, statistics or None) of a weight-update job (update_weights, edit_sequence):
    the spec's options with the preservation file and the projector cache folder where the backend reads
    them, its layers checked on the model; the template's second moment attached where the options ask for it
    (muke.update.template_keys.attach_template: computed once, on the unedited model)."""
    from muke.update.backends import BACKENDS
    from muke.update.template_keys import attach_template

    p = spec["params"]
    backend, options = BACKENDS[p["backend"]], dict(p["options"])
    if backend.preservation:
        options["preservation"] = str(preservation)
    if cache_dir and "cache_dir" in backend.options.values():
        options["cache_dir"] = str(cache_dir)
    em = load_model(model, p["dtype"], device)
    check_layers(em, options["layers"], f"hparams.{backend.layers_key}")
    loaded = load_statistics(spec, stats, em, options["layers"])
    attach_template(em, loaded, options)
    return em, options, loaded


def _row(
    batch: int, request_ids: list[str], file: str | None = None, seconds: float = 0.0, reason: str | None = None
) -> dict:
    return {
        "batch": batch,
        "file": file,
        "request_ids": json.dumps(request_ids),
        "failed": file is None,
        "seconds": seconds,
        "reason": reason,
    }


@command("weight updates ΔW of one shard", cache_dir="AlphaEdit null-space projectors")
def update_weights(
    spec: dict,
    model: str | Path,
    memories: str | Path | None = None,
    out: str | Path | None = None,
    *,
    requests: str | Path | None = None,
    shard: int | None = None,
    stats: str | Path | None = None,
    preservation: str | Path | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
) -> Path:
    """Weight updates ΔW of a shard, one file per edit batch (one request per batch by default), from its
    target memories (`memories`) or, for a backend without them (ft, lora), from shard `shard` of `requests`.

    `out` (Parquet, one row per batch): batch, file, request_ids (JSON list), failed, seconds, reason, sha256
    (of file, verified by read_update_index; the index's own in NAME.sha256); the
    muke.update.weights.WeightUpdate files lie in the folder named like `out` without its suffix. A request
    whose δ optimisation failed or that was skipped gets a row of its own (batch -1, no file); a batch
    whose update is not finite (NumericalError) gets a failed row and the other batches go on.
    """
    import pandas as pd

    from muke.numerics import NumericalError
    from muke.update.edit import compute_update
    from muke.update.weights import WeightUpdate

    if out is None or (memories is None) == (requests is None or shard is None):
        raise ValueError("update-weights needs --out, and --memories or (no target memories) --requests and --shard")
    p, out, backend = spec["params"], Path(out), spec["params"]["backend"]
    em, options, loaded = set_up(spec, model, device, stats, preservation, cache_dir)
    layers, keys = options.pop("layers"), options.pop("keys")
    found, failed = targets(memories) if memories is not None else encoded(spec, em, requests, shard)
    rows = [_row(-1, [rid], reason=reason) for rid, reason in failed]
    size = p["edit_batch_size"]
    for b, start in enumerate(range(0, len(found), size)):
        batch, path = found[start : start + size], out.with_suffix("") / f"{b:04d}.safetensors"
        update = WeightUpdate.load(path) if path.is_file() else None
        if update is None or update.info.get("identity") != spec["identity"]:
            log(f"batch {b}: {backend} update of {[t.id for t in batch]} on layers {layers}")
            try:
                update = compute_update(
                    em,
                    batch,
                    backend,
                    layers,
                    keys,
                    stats=loaded,
                    method=p["method"],
                    memory=p.get("memory"),
                    **options,
                )
            except NumericalError as e:
                log(f"batch {b}: failed ({e})")
                rows.append(_row(b, [t.id for t in batch], reason=str(e)))
                continue
            update.info["identity"] = spec["identity"]
            update.save(path)
        else:
            log(f"batch {b}: finished earlier ({path.name})")
        rows.append(
            {
                **_row(b, update.request_ids, path.name, float(update.info.get("seconds", 0.0))),
                "sha256": sha256(path),
                "unsettled": unsettled_cell(f"batch {b}", update.info),
            }
        )
    strings = {"file": "string", "reason": "string", "sha256": "string", "unsettled": "string"}
    frame = pd.DataFrame(rows, columns=INDEX_COLUMNS).astype(strings)
    write_parquet(frame, out)
    record_sha256(out)
    write_manifest(out.parent / "manifest.json", spec)
    return out
