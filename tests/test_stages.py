"""Workflow stages called in-process: atomic outputs and resumption of a shard killed midway."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

import muke.stages as stages
from muke.plan import Plan

REPO = Path(__file__).resolve().parent.parent
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())


@pytest.fixture()
def plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resources").symlink_to(REPO / "resources")
    config = copy.deepcopy(TINY)
    config["methods"] = ["muke-memit"]
    return Plan(config)


def spec(s):
    return json.loads(s.to_json())


def test_atomic_writes_leave_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    stages.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with stages.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_prepare_model_references_a_local_folder(tmp_path, tiny_qwen2_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resources").symlink_to(REPO / "resources")
    config = copy.deepcopy(TINY)
    config["models"] = {"mine": {"preset": "tiny", "source": str(tiny_qwen2_path)}}
    model = Plan(config).models["mine"]
    out = stages.prepare_model(spec(model.spec), tmp_path / "models" / model.id)
    assert stages.model_path(out) == str(tiny_qwen2_path)
    assert json.loads((out / "manifest.json").read_text())["identity"] == model.spec.identity


def test_optimize_deltas_resumes_a_killed_shard(plan, tiny_qwen2_path, tmp_path, monkeypatch):
    run = next(r for r in plan.runs if r.method == "muke-memit")
    model_dir = tmp_path / "model"
    stages.write_json(model_dir / stages.MODEL_REF, {"path": str(tiny_qwen2_path)})
    out, trace = Path(plan.deltas_path(run, 0)), Path(plan.deltas_path(run, 0)).with_suffix(".trace.parquet")
    calls, real = [], stages._optimise_one

    def killed_after_one(em, request, cfg):
        if calls:
            raise KeyboardInterrupt("the job is killed")
        calls.append(request.id)
        return real(em, request, cfg)

    monkeypatch.setattr(stages, "_optimise_one", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        stages.optimize_deltas(spec(run.deltas), model_dir, "resources/demo_edits.jsonl", 0, out, trace, "cpu")
    assert not out.exists() and len(list(out.with_name("shard0.parts").iterdir())) == 1

    calls.clear()
    monkeypatch.setattr(stages, "_optimise_one", lambda em, request, cfg: (calls.append(request.id), real(em, request, cfg))[1])
    stages.optimize_deltas(spec(run.deltas), model_dir, "resources/demo_edits.jsonl", 0, out, trace, "cpu")
    assert calls == ["demo-01"]                        # demo-00 came from its part file
    meta, tensors = stages.read_deltas(out)
    assert [r["id"] for r in meta["requests"]] == ["demo-00", "demo-01"]
    assert tensors["0.z"].shape[1] == 128 and not out.with_name("shard0.parts").exists()

    # a part file of another identity (other settings) is not trusted
    other = {**spec(run.deltas), "identity": "0000000000"}
    assert stages._read_part(out.with_name("x.safetensors"), other["identity"]) is None

    # the update stage resumes per batch too
    stats_path = Path(plan.stats_path(run.model, run.stats))
    stages.collect_stats(spec(run.stats), model_dir, plan.stats_corpus(run.stats), stats_path, "cpu")
    index = Path(plan.update_path(run, 0))
    stages.update_weights(spec(run.update), model_dir, out, index, stats=stats_path, device="cpu")
    first = {p.name: p.stat().st_mtime_ns for p in index.with_suffix("").iterdir()}
    assert sorted(first) == ["0000.safetensors", "0001.safetensors"]
    os.remove(index)
    stages.update_weights(spec(run.update), model_dir, out, index, stats=stats_path, device="cpu")
    assert {p.name: p.stat().st_mtime_ns for p in index.with_suffix("").iterdir()} == first
    rows = stages.read_update_index(index)
    assert [r["request_ids"] for r in rows] == [["demo-00"], ["demo-01"]]


def test_stages_compute_what_update_edit_computes(plan, tiny_qwen2_path, tmp_path):
    """optimize_deltas → files → update_weights gives the delta of muke.update.edit in one process."""
    import torch

    from muke.data import load_requests_checked
    from muke.model import load
    from muke.stats import load_stats
    from muke.update import WeightDelta, edit

    run = next(r for r in plan.runs if r.method == "muke-memit")
    model_dir = tmp_path / "model"
    stages.write_json(model_dir / stages.MODEL_REF, {"path": str(tiny_qwen2_path)})
    deltas = Path(plan.deltas_path(run, 0))
    stages.optimize_deltas(spec(run.deltas), model_dir, "resources/demo_edits.jsonl", 0, deltas,
                           deltas.with_suffix(".trace.parquet"), "cpu")
    stats_path = Path(plan.stats_path(run.model, run.stats))
    stages.collect_stats(spec(run.stats), model_dir, plan.stats_corpus(run.stats), stats_path, "cpu")
    index = Path(plan.update_path(run, 0))
    stages.update_weights(spec(run.update), model_dir, deltas, index, stats=stats_path, device="cpu")
    staged = WeightDelta.load(stages.read_update_index(index)[0]["path"])

    em = load(tiny_qwen2_path)
    request = load_requests_checked("resources/demo_edits.jsonl", "jsonl")[0][0]
    direct, _ = edit(em, [request], "muke-memit", run.hparams, load_stats(stats_path, em, run.update.params["options"]["layers"]))
    assert staged.request_ids == direct.request_ids == [request.id]
    for layer in direct.factors:
        torch.testing.assert_close(staged.dense(layer), direct.dense(layer), rtol=1e-4, atol=1e-6)
