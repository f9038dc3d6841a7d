"""editing.mode sequential in the workflow: the plan's identities, the edit_sequence stage resuming after
kill -9, the report's retention / locality curves, and a real Snakemake run on the tiny model."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pandas as pd
import pytest
import torch

from muke.eval import sequential
from muke.update.weights import WeightUpdate
from muke.workflow.config import ConfigError
from muke.workflow.plan import Plan
from tests.test_workflow import REPO, TINY, env, make_workdir, needs_snakemake, planned, snakemake, snapshot

SEQUENTIAL = {"mode": "sequential", "batch_size": 1, "checkpoints": [1, 2]}


def sequential_config(**editing) -> dict:
    config = copy.deepcopy(TINY)
    config["editing"] = {**SEQUENTIAL, **editing}
    config["methods"] = ["muke-memit", "matryoshka+alphaedit"]
    return config


# ---------------------------------------------------------------------------- the plan


def test_plan_a_run_per_checkpoint_sharing_one_sequence_whose_identity_ignores_the_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(make_workdir(tmp_path))
    plan = Plan(sequential_config())
    runs = [r for r in plan.runs if r.method == "muke-memit"]
    assert [(r.setting, r.n_edits) for r in runs] == [({"n_edits": 1}, 1), ({"n_edits": 2}, 2)]
    assert len({r.sequence.identity for r in runs}) == 1 and all(r.memories is None for r in runs)
    assert [r.generate.params["selection"]["limit"] for r in runs] == [1, 2]
    assert len({r.generate.identity for r in runs}) == len({r.locality.identity for r in runs}) == 2
    other = Plan(sequential_config(checkpoints=[2]))
    (last,) = [r for r in other.runs if r.method == "muke-memit"]
    assert last.sequence.identity == runs[0].sequence.identity  # no edit redone
    assert (last.generate.identity, last.locality.identity) == (runs[1].generate.identity, runs[1].locality.identity)
    moved = Plan(sequential_config(batch_size=2, checkpoints=[2]))
    assert [r.sequence.identity for r in moved.runs if r.method == "muke-memit"] != [runs[0].sequence.identity]
    with pytest.raises(ConfigError, match=r"editing\.checkpoints: 3 edits"):
        Plan(sequential_config(checkpoints=[3]))
    with pytest.raises(ConfigError, match=r"editing\.checkpoints: 1 edits is not a multiple of editing\.batch_size 2"):
        Plan(sequential_config(batch_size=2, checkpoints=[1]))


def test_the_sequence_options_enter_the_edit_sequence_identity_where_set(tmp_path, monkeypatch):
    """editing.preserve_earlier / weight_growth / resolve_every: in the spec and identity where not their
    defaults (a sequence made before them keeps its identity); a backend that cannot honour one is refused."""
    monkeypatch.chdir(make_workdir(tmp_path))

    def sequence(method="muke-memit", **editing):
        config = sequential_config(**editing)
        config["methods"] = [method]
        return next(r.sequence for r in Plan(config).runs if r.method == method)

    today = sequence()
    assert sequence(preserve_earlier=False, weight_growth=0, resolve_every=None).identity == today.identity
    assert not {"preserve_earlier", "weight_growth", "resolve_every"} & set(today.params)
    options = [{"resolve_every": 2}, {"resolve_every": 3}, {"preserve_earlier": True}, {"weight_growth": 0.5}]
    changed = [sequence(**option) for option in options]
    assert len({today.identity, *(s.identity for s in changed)}) == 5
    assert all(spec.params[k] == v for spec, option in zip(changed, options) for k, v in option.items())
    alphaedit = "matryoshka+alphaedit"  # preserve_earlier is implied there: the same sequence
    assert sequence(alphaedit, preserve_earlier=True).identity == sequence(alphaedit).identity
    with pytest.raises(ConfigError, match=r"editing\.weight_growth: backend 'alphaedit'.*matryoshka\+alphaedit"):
        Plan(sequential_config(weight_growth=0.5))
    with pytest.raises(ConfigError, match=r"editing\.resolve_every: backend 'unke'"):
        sequence("muke-unke", resolve_every=2)
    with pytest.raises(ConfigError, match="resolve_every"):
        Plan(sequential_config(resolve_every=0))
    with pytest.raises(ConfigError, match=r"editing\.recheck_earlier: .*edit_passes ≥ 2 \(got 1\).*muke-memit"):
        sequence(recheck_earlier=True)
    config = sequential_config(recheck_earlier=True)
    config["methods"], config["hparams"] = ["muke-memit"], {"edit_passes": 2}
    with pytest.raises(ConfigError, match=r"editing\.recheck_earlier: .*v_stop_prob \(got None\)"):
        Plan(config)
    config["hparams"]["v_stop_prob"] = 0.5
    (rechecked,) = {r.sequence.identity: r.sequence for r in Plan(config).runs if r.sequence}.values()
    assert rechecked.params["recheck_earlier"] is True and rechecked.identity != today.identity


# ---------------------------------------------------------------------------- the stage: kill -9, resume


def _prepare(plan: Plan, run, root):
    """The prepared tiny model and its statistics, made in-process by the stage functions."""
    from muke.workflow.stages.collect_stats import collect_stats
    from muke.workflow.stages.prepare_model import prepare_model

    model = root / plan.model_dir(run.model)
    prepare_model(json.loads(run.model.spec.to_json()), model)
    stats = root / plan.stats_path(run.model, run.stats)
    collect_stats(json.loads(run.stats.to_json()), model, plan.stats_corpus(run.stats), stats, device="cpu")
    return model, stats


def _edit_sequence_cmd(run, model, requests, stats, out) -> list[str]:
    return [
        sys.executable, "-m", "muke", "stage", "edit-sequence", "--spec", run.sequence.to_json(), "--model",
        str(model), "--requests", str(requests), "--stats", str(stats), "--out", str(out), "--device", "cpu",
        "--threads", "1",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["matryoshka+alphaedit"])
def test_edit_sequence_killed_after_a_batch_resumes_to_the_uninterrupted_chain(tmp_path, monkeypatch, method):
    workdir = make_workdir(tmp_path / "work")
    monkeypatch.chdir(workdir)
    config = sequential_config(checkpoints=[3])
    config["datasets"]["demo"]["limit"] = 3
    config["hparams"] = {"v_num_grad_steps": 8}
    plan = Plan(config)
    (run,) = [r for r in plan.runs if r.method == method]
    model, stats = _prepare(plan, run, workdir)
    requests = run.dataset.path
    whole, killed = workdir / "whole" / "chain.parquet", workdir / "killed" / "chain.parquet"
    e = env(REPO)
    subprocess.run(_edit_sequence_cmd(run, model, requests, stats, whole), check=True, env=e, capture_output=True)

    proc = subprocess.Popen(_edit_sequence_cmd(run, model, requests, stats, killed), env=e, stderr=subprocess.PIPE)
    first, deadline = killed.with_suffix("") / "0000.safetensors", time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    made = sorted(p.name for p in killed.with_suffix("").iterdir())
    assert proc.returncode == -signal.SIGKILL and not killed.exists() and "0000.safetensors" in made
    assert "0002.safetensors" not in made, "the job finished before it was killed"

    resumed = subprocess.run(
        _edit_sequence_cmd(run, model, requests, stats, killed), env=e, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "batch 0: finished earlier, replayed" in resumed.stderr
    a, b = pd.read_parquet(whole), pd.read_parquet(killed)
    timing = ["seconds", "sha256"]  # the ΔW files' metadata holds their wall-clock time, so their sha256 differ
    pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing))
    assert list(a["n_edits"]) == [1, 2, 3]
    for name in a["file"]:
        u, v = WeightUpdate.load(whole.with_suffix("") / name), WeightUpdate.load(killed.with_suffix("") / name)
        for layer, (U, V) in u.factors.items():
            assert torch.equal(U, v.factors[layer][0]) and torch.equal(V, v.factors[layer][1])
        assert all(torch.equal(K, v.keys[layer]) for layer, K in u.keys.items())


def test_edit_sequence_with_resolve_every_resumes_from_its_links_and_target_memories(tmp_path, monkeypatch, capsys):
    """A job that re-solves every 2nd batch, stopped after batch 0 (its ΔW and z files kept), resumes to the
    chain of an uninterrupted job: batch 1 re-solves with batch 0's z read back from its file."""
    from muke.workflow.stages.edit_sequence import edit_sequence

    workdir = make_workdir(tmp_path / "work")
    monkeypatch.chdir(workdir)
    config = sequential_config(checkpoints=[3], resolve_every=2)
    config["methods"], config["datasets"]["demo"]["limit"] = ["muke-memit"], 3
    plan = Plan(config)
    (run,) = [r for r in plan.runs if r.method == "muke-memit"]
    model, stats = _prepare(plan, run, workdir)
    spec = json.loads(run.sequence.to_json())
    whole, stopped = workdir / "whole" / "chain.parquet", workdir / "stopped" / "chain.parquet"
    for out in (whole, stopped):
        edit_sequence(spec, model, run.dataset.path, out, stats=stats, device="cpu")
    for path in stopped.with_suffix("").glob("000[12]*"):
        path.unlink()
    stopped.unlink()
    capsys.readouterr()
    edit_sequence(spec, model, run.dataset.path, stopped, stats=stats, device="cpu")
    assert "batch 0: finished earlier, replayed" in capsys.readouterr().err
    a, b = pd.read_parquet(whole), pd.read_parquet(stopped)
    assert list(a["n_edits"]) == [1, 2, 3] and not a["failed"].any()
    u = [WeightUpdate.load(whole.with_suffix("") / name) for name in a["file"]]
    v = [WeightUpdate.load(stopped.with_suffix("") / name) for name in b["file"]]
    assert [x.info.get("resolved", False) for x in u] == [False, True, False]
    for x, y in zip(u, v):
        assert x.factors.keys() == y.factors.keys() and x.params.keys() == y.params.keys()
        assert all(torch.equal(s, t) for layer in x.factors for s, t in zip(x.factors[layer], y.factors[layer]))
        assert all(torch.equal(d, y.params[name]) for name, d in x.params.items())


# ---------------------------------------------------------------------------- the report's curves


def _samples() -> pd.DataFrame:
    """Per-sample rows of one sequential run at checkpoints 1 and 2 (request a edited first)."""
    rows = []
    for n, scores in ((1, {"a": 80.0}), (2, {"a": 40.0, "b": 90.0})):
        for rid, bleu in scores.items():
            for family in ("paper", "standard"):
                rows.append(
                    {"model": "m", "dataset": "d", "method": "muke-memit", "setting": json.dumps({"n_edits": n}),
                     "id": rid, "kind": "question", "family": family, "bleu": bleu, "rouge_l": bleu / 2}
                )  # fmt: skip
    rows.append({"model": "m", "dataset": "d", "method": "pre-edit", "setting": "", "id": "a", "kind": "question",
                 "family": "paper", "bleu": 10.0, "rouge_l": 5.0})  # fmt: skip
    return pd.DataFrame(rows)


def test_retention_curve_follows_the_first_k_edits_over_later_checkpoints():
    curve = sequential.retention_curve(_samples())
    bleu = curve[curve["metric"] == "bleu"].set_index(["first_k", "n_edits"])["value"].to_dict()
    assert bleu == {(1, 1): 80.0, (1, 2): 40.0, (2, 2): 65.0}
    assert set(curve["series"]) == {"muke-memit"}
    assert sequential.retention_curve(_samples().query("method == 'pre-edit'")) is None


def test_locality_curve_starts_at_the_unedited_model_and_the_section_renders():
    loc = pd.DataFrame(
        [
            {"model": "m", "dataset": "", "method": "pre-edit", "setting": "", "model_state": "pre-edit",
             "task": "retention", "metric": "answer_char_bleu", "value": 1.0, "stderr": None},
            *[{"model": "m", "dataset": "d", "method": "muke-memit", "setting": json.dumps({"n_edits": n}),
               "model_state": "edited", "task": "retention", "metric": "answer_char_bleu", "value": v, "stderr": 0.1}
              for n, v in ((1, 0.8), (2, 0.6))],
        ]
    )  # fmt: skip
    curve = sequential.locality_curve(loc)
    assert list(zip(curve["n_edits"], curve["value"])) == [(0, 1.0), (1, 0.8), (2, 0.6)]
    parts, tables = sequential.section(_samples(), loc)
    html = "\n".join(parts)
    assert "Retention curve" in html and "Locality curve" in html and "<img" in html
    assert list(tables["sequential_retention"].columns) == ["after 1", "after 2"]
    assert list(tables["sequential_locality"].columns) == ["unedited", "after 1", "after 2"]
    assert sequential.section(_samples().query("method == 'pre-edit'"), loc) == ([], {})


# ---------------------------------------------------------------------------- a real Snakemake run


@pytest.mark.slow
@needs_snakemake
def test_sequential_workflow_runs_and_changing_checkpoints_redoes_no_edit(tmp_path_factory):
    repo = snapshot(tmp_path_factory.mktemp("snapshot") / "repo")
    workdir = make_workdir(tmp_path_factory.mktemp("sequential"), repo)
    config = sequential_config()
    config["locality"] = {
        **config["locality"],
        "tasks": [],
        "retention": {**config["locality"]["retention"], "enabled": True},
    }
    snakemake(workdir, config, repo=repo, timeout=3600)
    results = workdir / config["results"]
    chains = sorted((results / "sequences" / "tiny" / "demo").glob("*/chain.parquet"))
    assert len(chains) == 2 and all(list(pd.read_parquet(c)["n_edits"]) == [1, 2] for c in chains)
    metrics = pd.read_parquet(results / "tables" / "edit_metrics.parquet")
    edited = metrics[metrics["method"] != "pre-edit"]
    assert set(edited["setting"]) == {'{"n_edits": 1}', '{"n_edits": 2}'}
    loc = pd.read_parquet(results / "tables" / "locality.parquet")
    assert set(loc.loc[loc["model_state"] == "edited", "setting"]) == {'{"n_edits": 1}', '{"n_edits": 2}'}
    html = (results / "report" / "index.html").read_text()
    assert "id='sequential'" in html and "Retention curve" in html and "Locality curve" in html
    assert planned(workdir, config, repo) == Counter()
    # a checkpoint less: nothing but the report; a checkpoint more would only add generate / score / locality
    assert planned(workdir, sequential_config(checkpoints=[2]) | {"locality": config["locality"]}, repo) == Counter(
        report=1
    )
