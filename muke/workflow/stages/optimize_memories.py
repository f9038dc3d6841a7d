"""optimize_memories: target memories z = h + δ of every request of a shard (docs/ALGORITHM.md §4), in the δ
batches of muke.update.memories (the stage keeps its rule's and command's name, `optimize`; the code says
`optimise`, as the engine does).

Each request's result is kept in a part file tagged with the job's identity as soon as its batch of δ
loops ends, so a killed job resumes after the requests it finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from muke.io import record_sha256, write_parquet, write_safetensors
from muke.workflow.stages.command import command
from muke.workflow.stages.common import check_layers, load_model, log, shard_requests, write_manifest


def _optimise_many(em, requests, cfg) -> list[tuple[dict, dict, list[dict]]]:
    """(tensors, record, trace rows) of each request of one δ batch (muke.update.memories.optimise_group);
    a NumericalError gives that request a failed record."""
    import torch

    from muke.numerics import NumericalError
    from muke.update.memories import optimise_group

    out = []
    for request, (seq, res) in zip(requests, optimise_group(em, requests, cfg)):
        if isinstance(res, NumericalError):
            log(f"request {request.id}: failed ({res})")
            out.append(({}, {"id": request.id, "failed": True, "error": str(res)}, []))
            continue
        tensors = {
            "z": res.z,
            "h": res.h,
            "delta": res.delta,
            "positions": torch.tensor(res.positions, dtype=torch.int64),
            "prompt_ids": torch.tensor(seq.prompt_ids, dtype=torch.int64),
            "target_ids": torch.tensor(seq.target_ids, dtype=torch.int64),
            "windows": torch.tensor(seq.windows, dtype=torch.int64).reshape(-1, 2),
            **{
                f"rendering{r}.prompt_ids": torch.tensor(o.prompt_ids, dtype=torch.int64)
                for r, o in enumerate(seq.renderings)
            },
        }
        record = {
            "id": request.id,
            "failed": False,
            "prompt": seq.prompt,
            "renderings": [{"prompt": o.prompt, "first_hook": o.first_hook} for o in seq.renderings],
            "n_windows": seq.n_windows,
            "seconds": res.seconds,
            "affinity_seconds": res.affinity_seconds,
            "lambdas": res.lambdas,
            "affinities": res.affinities,
        }
        out.append((tensors, record, [{"id": request.id, **row} for row in res.trace]))
    return out


def _read_part(path: Path, identity: str):
    """(tensors, record, trace) of a finished part file of this job, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("muke", "{}"))
        if meta.get("identity") != identity:
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta["record"], meta["trace"]


def fit_for_model(chosen: list, em, cfg, requests: str | Path, on_bad_record: str) -> tuple[list, list]:
    """(the requests the model can take, a `skipped` row for each other), checked before any
    optimisation (templating, context length): a problem stops the job, or with on_bad_record "skip"
    leaves the request out."""
    from muke.data import model_problems

    problems = model_problems(
        chosen, em.tokenizer, em.context_length or float("inf"), requests, cfg.system_prompt, cfg.chat_template
    )
    if problems and on_bad_record == "error":
        raise ValueError(
            "requests this model cannot edit (on_bad_record: skip leaves them out):\n  "
            + "\n  ".join(map(str, problems))
        )
    unfit = {e.id for e in problems}
    for request in (r for r in chosen if r.id in unfit):
        log(f"request {request.id}: skipped ({'; '.join(e.reason for e in problems if e.id == request.id)})")
    return [r for r in chosen if r.id not in unfit], [{**e.to_dict(), "check": "model"} for e in problems]


def _optimise_shard(em, chosen: list, cfg, parts: Path, *, batch: int, identity: str) -> list:
    """(tensors, record, trace rows) of every request; finished part files are reused, new ones written."""
    import torch

    from muke.update.memories import batches_of

    done = {i: _read_part(parts / f"{i:05d}.safetensors", identity) for i in range(len(chosen))}
    # whole batches of the uninterrupted run only: a batch a kill left part-written is optimised again, together
    groups = [g for g in batches_of(range(len(chosen)), batch) if any(done[i] is None for i in g)]
    for i in (i for i, d in done.items() if d is not None and not any(i in g for g in groups)):
        log(f"request {i + 1}/{len(chosen)} {chosen[i].id}: finished earlier (part file)")
    for group in groups:
        names = ", ".join(f"{i + 1}/{len(chosen)} {chosen[i].id}" for i in group)
        log(f"request{'s' * (len(group) > 1)} {names}: optimising {cfg.objective} memories at layer {cfg.layer}")
        for i, result in zip(group, _optimise_many(em, [chosen[i] for i in group], cfg)):
            t, record, trace_rows = result
            write_safetensors(
                parts / f"{i:05d}.safetensors",
                t or {"empty": torch.zeros(0)},
                {"muke": json.dumps({"identity": identity, "record": record, "trace": trace_rows})},
            )
            done[i] = result
    return [done[i] for i in range(len(chosen))]


@command("target memories of one shard of requests", shard="index of the shard (datasets.<name>.shard_size each)")
def optimize_memories(
    spec: dict,
    model: str | Path,
    requests: str | Path,
    shard: int,
    out: str | Path,
    trace: str | Path,
    device: str = "auto",
) -> Path:
    """Target memories z = h + δ of every request of a shard (docs/ALGORITHM.md §4).

    `out` (safetensors): f"{i}.z", "{i}.h", "{i}.delta" (n_windows, d_model), "{i}.positions",
    "{i}.prompt_ids", "{i}.target_ids", "{i}.windows" for request i of the shard, and "{i}.rendering{r}.prompt_ids"
    of its other renderings (hparams.renderings > 1); metadata "muke" lists the requests (`failed`, `error`;
    `renderings`: each other rendering's prompt and first hook) and the records left out (`skipped`: record, line, id,
    field, reason, message, check "file" or "model"; see common.shard_requests). `trace` (Parquet):
    the loss per window and step of every request. Params "batch" (hparams.delta_batch_size):
    requests optimised together (memory.optimise_batch); "auto": as many as the budget "delta_memory_gib"
    (hparams.delta_memory_gib) holds, whatever memory is free (muke.engine.batch_size).
    """
    import pandas as pd
    import torch

    from muke.engine.batch_size import DEFAULT_BUDGET_GIB
    from muke.engine.memory import MemoryConfig
    from muke.update.memories import delta_batch

    p, out = spec["params"], Path(out)
    skipped = []
    chosen = shard_requests(requests, p["selection"], shard, skipped)
    em = load_model(model, p["dtype"], device)
    cfg = MemoryConfig(**p["memory"])
    check_layers(em, [cfg.layer], "hparams.layers or unke_layers (the last: the working-memory layer)")
    chosen, unfit = fit_for_model(chosen, em, cfg, requests, p["selection"].get("on_bad_record", "error"))
    skipped += unfit
    parts = out.with_name(out.stem + ".parts")
    budget = p.get("delta_memory_gib", DEFAULT_BUDGET_GIB)
    batch = delta_batch(em, chosen, cfg, p.get("batch", 1), budget)
    if p.get("batch", 1) == "auto":
        log(f"{len(chosen)} requests, {batch} per δ batch (delta_batch_size auto: a {budget:g} GiB budget)")
    results = _optimise_shard(em, chosen, cfg, parts, batch=batch, identity=spec["identity"])
    tensors, records, rows = {}, [], []
    for i, (t, record, trace_rows) in enumerate(results):
        tensors.update({f"{i}.{k}": v for k, v in t.items() if k != "empty"})
        records.append({"index": i, **record})
        rows += trace_rows
    write_parquet(pd.DataFrame(rows, columns=None if rows else ["id", "window", "step", "loss"]), trace)
    meta = {
        "format": "muke.memories/1",
        "identity": spec["identity"],
        "shard": shard,
        "requests": records,
        "skipped": skipped,
    }
    write_safetensors(out, tensors or {"empty": torch.zeros(0)}, {"muke": json.dumps(meta)})
    record_sha256(out)
    write_manifest(out.parent / "manifest.json", spec)
    shutil.rmtree(parts, ignore_errors=True)
    return out
