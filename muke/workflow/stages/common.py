"""What the stages share: manifests, logging, prepared models, shard selection and the readers of
the files one stage writes for another (memories shards, update indexes).

Every file is written atomically (muke.io: temporary file in the same folder, fsync, rename): a
killed job leaves either the old file or none, never a half-written one that a rerun would trust.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

from muke.io import sha256, verify_sha256, write_json

MODEL_REF = "muke_model.json"  # in a prepared model folder: where the weights are, and their provenance


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("muke", "torch", "transformers", "lm_eval"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _host() -> dict:
    """Where the job ran: the machine and its torch / CUDA / GPU facts (muke.host.torch_info)."""
    from muke.host import torch_info

    return {"hostname": platform.node(), **torch_info()}


def write_manifest(path: str | Path, spec: dict, **facts) -> Path:
    """The resolved parameters, input identities and code identity of a job, the library versions, the
    host it ran on (its GPUs: the report's hardware facts come from here) and any other `facts` of the
    job (e.g. the generate stage's effective decoding settings).

    The same for every shard of a run (timings are in results/benchmarks), so shard jobs may write it
    concurrently."""
    return write_json(path, {**spec, "versions": _versions(), "host": _host(), **facts})


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- models


def model_path(model_dir: str | Path) -> str:
    """Where to load a prepared model from: the folder itself, or the path/hub snapshot it names."""
    ref = json.loads((Path(model_dir) / MODEL_REF).read_text())
    return ref.get("path") or str(model_dir)


def load_model(model_dir: str | Path, dtype: str, device: str):
    """The prepared model; Python code shipped with it runs only where its config said trust_remote_code.
    Offline (HF_HUB_OFFLINE=1), files missing on this node are an error naming the model and its path."""
    from muke.hub import missing_offline
    from muke.model import load

    ref = json.loads((Path(model_dir) / MODEL_REF).read_text())
    trust = ref.get("trust_remote_code", False)
    log(f"loading {model_dir} ({dtype}, device {device}{', trusting its remote code' if trust else ''})")
    with missing_offline(
        f"model {ref.get('source', model_dir)} (prepared in {model_dir}, files at {model_path(model_dir)})"
    ):
        return load(model_path(model_dir), dtype=dtype, device=device, trust_remote_code=trust)


def check_layers(em, layers: list[int], key: str) -> None:
    """Layer indices the plan could not check (a model whose preset does not state its layers)."""
    from muke.model import ModelError

    for layer in layers:
        try:
            em.check_layer(layer)
        except ModelError as e:
            raise ModelError(f"config key {key}: {e}") from None


# ---------------------------------------------------------------------------- requests


def _check_identity(path: str | Path, identity: dict) -> None:
    """A data file must still be the one the plan hashed (SLURM jobs start later than the plan;
    identity: muke.workflow.identity.file_identity, checked where it holds a sha256)."""
    if "sha256" in identity and sha256(path) != identity["sha256"]:
        raise ValueError(f"{path} changed after the workflow was planned: rerun snakemake")


def shard_requests(path: str | Path, selection: dict, shard: int, skipped: list | None = None) -> list:
    """The requests of one shard: the selection's usable requests (muke.data.select: ids, offset, limit),
    `shard_size` per shard.

    With the selection's on_bad_record "skip" a record that cannot be read is left out before the limit
    and the sharding apply; `skipped`, when given, receives a row (DataError.to_dict) for each one that
    lies among this shard's records, so that every left-out record is listed by exactly one shard.
    """
    from muke.data import load_requests_checked, select

    _check_identity(path, selection["file"])
    requests, bad = load_requests_checked(path, selection["format"], selection.get("on_bad_record", "error"))
    limited = select(requests, ids=selection.get("ids"), offset=selection.get("offset"), limit=selection["limit"])
    size = selection["shard_size"]
    chosen = limited[shard * size : (shard + 1) * size]
    if not chosen:
        raise ValueError(f"{path}: shard {shard} is empty ({len(limited)} requests, {size} per shard)")
    if skipped is not None:
        first = limited[shard * size - 1].record + 1 if shard else 0  # just after the previous shard
        last = chosen[-1].record
        if chosen[-1] is limited[-1] and len(limited) == len(requests):  # the last shard takes the file's tail
            last = float("inf")
        skipped += [{**e.to_dict(), "check": "file"} for e in bad if first <= e.record <= last]
    return chosen


# ---------------------------------------------------------------------------- files between stages


def read_memories(path: str | Path) -> tuple[dict, dict]:
    """(metadata, tensors) of an optimize_memories shard file, its recorded sha256 verified."""
    from safetensors.torch import load_file

    return read_memories_meta(path), load_file(str(path))


def read_memories_meta(path: str | Path) -> dict:
    """The metadata of an optimize_memories shard file (its requests, failures and skipped records), its
    recorded sha256 (NAME.sha256) verified."""
    from safetensors import safe_open

    verify_sha256(path)
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["muke"])


def unsettled_cell(where: str, info: dict) -> str | None:
    """An update index's or chain's `unsettled` cell: JSON of muke.update.edit.further_passes' info["unsettled"]
    (None without edit passes); the requests it left short are logged."""
    unsettled = info.get("unsettled")
    if unsettled:
        short = "; ".join(
            f"{rid}: windows {w['short']} below it"
            + (f", the greedy answer leaves the target in {w['off_target']}" if w["off_target"] else "")
            for rid, w in unsettled.items()
        )
        passes = 1 + len(info["passes"])
        log(f"{where}: after {passes} edit passes still short of the stop probability: {short}")
    return None if unsettled is None else json.dumps(unsettled)


def read_update_index(path: str | Path) -> list[dict]:
    """Rows of an update_weights index, with `request_ids` as lists, `path` the ΔW file (or None), `reason` why
    a row failed (None for a ΔW) and `unsettled` (muke.update.edit.further_passes' info["unsettled"]: the windows
    still short after the last edit pass; None without passes); the index's and each ΔW file's sha256 verified."""
    import pandas as pd

    path = Path(path)
    verify_sha256(path)
    rows = pd.read_parquet(path).to_dict("records")
    for row in rows:
        row["request_ids"] = json.loads(row["request_ids"])
        for key in ("file", "reason", "sha256"):  # a missing value reads back as None, NaN or NA
            row[key] = row.get(key) if isinstance(row.get(key), str) else None
        row["path"] = path.with_suffix("") / row["file"] if row["file"] else None
        row["unsettled"] = json.loads(row["unsettled"]) if isinstance(row.get("unsettled"), str) else None
        if row["sha256"] and row["path"].exists():  # runtime.keep_updates false: gone once answered
            verify_sha256(row["path"], row["sha256"])
    return rows


def _chain_rows(path: Path, n_edits: int) -> list[dict]:
    """The rows of an edit_sequence chain's batches up to `n_edits` edits; the chain's sha256 verified."""
    import pandas as pd

    verify_sha256(path)
    return [row for row in pd.read_parquet(path).to_dict("records") if row["n_edits"] <= n_edits]


def chain_unsettled(path: str | Path, n_edits: int) -> list[dict]:
    """{batch, unsettled} of each batch of an edit_sequence chain up to `n_edits` edits whose edit passes ended
    with windows short ({request id: windows}, muke.update.edit.further_passes); the chain's sha256 verified."""
    return [
        {"batch": int(row["batch"]), "unsettled": json.loads(row["unsettled"])}
        for row in _chain_rows(Path(path), n_edits)
        if isinstance(row.get("unsettled"), str)
    ]


def read_chain(path: str | Path, n_edits: int) -> tuple[list[Path], set[str]]:
    """(the ΔW files of an edit_sequence chain up to `n_edits` edits, in order; the ids of the requests among
    them whose batch failed); the chain's and each ΔW file's sha256 verified."""
    path = Path(path)
    rows = _chain_rows(path, n_edits)
    files = [path.with_suffix("") / row["file"] for row in rows if not row["failed"]]
    for file, row in zip(files, (row for row in rows if not row["failed"])):
        if isinstance(row.get("sha256"), str) and file.exists():  # runtime.keep_updates false: gone once answered
            verify_sha256(file, row["sha256"])
    return files, {rid for row in rows if row["failed"] for rid in json.loads(row["request_ids"])}
