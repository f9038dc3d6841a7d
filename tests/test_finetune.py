"""The fine-tuning baselines ft and lora (muke.update.finetune, docs/ALGORITHM.md §5): each lowers the target
NLL, keeps its bound, reverts bit-exactly, saves and reloads, edits in a sequence, runs through `muke edit`,
the plan, the update stage, the estimate and (one Snakemake run) the workflow's report."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch

import muke.cli as cli
from muke.update.backends import BACKENDS
from muke.update.edit import edit, encoded_targets, target_nll
from muke.update.methods import parse_method, resolve_method
from muke.update.sequential import edit_sequence
from muke.update.weights import WeightUpdate, apply, touched
from muke.workflow.plan import Plan
from tests.conftest import first_words
from tests.test_workflow import TINY, make_workdir, needs_snakemake, snakemake, snapshot

# small budgets on the pretrained tiny model (4 layers): layers 1 and 2, as its preset's MEMIT layers
FT = {"layers": [1, 2], "ft_steps": 15, "ft_lr": 1e-3, "ft_norm_constraint": None}
LORA = {"layers": [1, 2], "lora_steps": 15}


@pytest.fixture(scope="module")
def request_(demo_requests):
    r = demo_requests[0]
    return type(r)(r.id, r.question, first_words(r.answer, 20))


def _snapshot(em) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in em.model.named_parameters()}


def _unchanged(em, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[n]) for n, p in em.model.named_parameters())


@pytest.mark.parametrize(
    "method, preset",
    [("ft", FT), ("lora", LORA)],
    ids=["ft", "lora"],
)
def test_baseline_lowers_the_target_nll_reverts_bit_exactly_and_reloads(
    pretrained_tiny, request_, tmp_path, method, preset
):
    em = pretrained_tiny
    memory, _, _ = resolve_method(method, preset)
    (target,) = encoded_targets(em, [request_], memory)
    before, modules = _snapshot(em), [type(m) for m in em.model.modules()]
    update, results = edit(em, [request_], method, preset)
    assert results == [] and not update.factors and update.backend == method
    assert _unchanged(em, before) and [type(m) for m in em.model.modules()] == modules  # adapters taken out
    assert not hasattr(em.model, "peft_config") and not any(p.requires_grad for p in em.model.parameters())
    pre = target_nll(em, target.seq)
    with apply(em, update):
        post = target_nll(em, target.seq)
    assert post < pre - 0.1, (pre, post)
    assert _unchanged(em, before)
    trace = update.info["trace"]
    assert trace[-1]["loss"] < trace[0]["loss"] and len(trace) <= 15
    layers = {int(name.split(".")[2]) for name in update.params}
    assert layers == {1, 2}
    declared = {id(p) for p in BACKENDS[method].changes(em, update.layers)}  # restored in a sequence
    assert {id(p) for p in touched(em, update)} <= declared
    loaded = WeightUpdate.load(update.save(tmp_path / "u.safetensors"))
    with apply(em, loaded):
        assert target_nll(em, target.seq) == post
    assert _unchanged(em, before)


def test_ft_changes_only_the_down_projections_within_its_norm_bound(pretrained_tiny, request_):
    em = pretrained_tiny
    update, _ = edit(em, [request_], "ft", {**FT, "ft_norm_constraint": 1e-4})
    assert sorted(update.params) == [f"model.layers.{l}.mlp.down_proj.weight" for l in (1, 2)]
    assert max(d.abs().max().item() for d in update.params.values()) <= 1e-4 * (1 + 1e-3)
    memory, _, _ = resolve_method("ft", FT)
    (target,) = encoded_targets(em, [request_], memory)
    pre = target_nll(em, target.seq)
    with apply(em, update):
        assert target_nll(em, target.seq) < pre


def test_lora_adapts_the_named_modules_and_stops_early(pretrained_tiny, request_):
    em = pretrained_tiny
    update, _ = edit(em, [request_], "lora", {**LORA, "lora_modules": ["down_proj"], "early_stop": 100.0})
    assert sorted(update.params) == [f"model.layers.{l}.mlp.down_proj.weight" for l in (1, 2)]
    assert len(update.info["trace"]) == 1  # the first loss is below 100: no step
    assert all(d.abs().max() == 0 for d in update.params.values())  # B starts at zero
    with pytest.raises(ValueError, match="lora_modules: layer 1 has no linear module 'qkv'"):
        edit(em, [request_], "lora", {**LORA, "lora_modules": ["qkv"]})


@pytest.mark.parametrize("method, preset", [("ft", FT), ("lora", LORA)], ids=["ft", "lora"])
def test_a_sequence_of_two_edits_chains_and_reverts(pretrained_tiny, demo_requests, method, preset):
    em = pretrained_tiny
    requests = [type(r)(r.id, r.question, first_words(r.answer, 12)) for r in demo_requests[:2]]
    before = _snapshot(em)
    chain = edit_sequence(em, [[r] for r in requests], method, preset)
    assert [u.request_ids for u in chain] == [[r.id] for r in requests]
    assert [u.info["sequence_index"] for u in chain] == [0, 1]
    assert _unchanged(em, before)
    memory, _, _ = resolve_method(method, preset)
    seqs = [t.seq for t in encoded_targets(em, requests, memory)]
    pre = [target_nll(em, s) for s in seqs]
    with apply(em, chain):
        post = [target_nll(em, s) for s in seqs]
    assert post[1] < pre[1]
    assert _unchanged(em, before)


def test_the_methods_resolve_without_a_delta_loop():
    memory, backend, options = resolve_method("ft", {"v_lr": 9.0, "early_stop": 0.5, "system_prompt": "Hi."})
    assert memory == {"layer": 8, "objective": "one_for_all", "system_prompt": "Hi.", "chat_template": True}
    assert (backend, options["layers"], options["early_stop"]) == ("ft", [4, 5, 6, 7, 8], 0.5)
    memory, backend, options = resolve_method("lora", {"lora_rank": 4, "lora_modules": ["o_proj"], "seed": 3})
    assert (options["rank"], options["modules"], options["seed"], options["early_stop"]) == (4, ["o_proj"], 3, 1e-2)
    with pytest.raises(ValueError, match="unknown method 'matryoshka\\+ft'"):
        parse_method("matryoshka+ft")


@pytest.mark.parametrize("method", ["ft", "lora"])
def test_muke_edit_runs_the_baseline(tiny_qwen2_path, capsys, tmp_path, method):
    preset = tmp_path / "small.yaml"
    preset.write_text(json.dumps({"ft_steps": 10, "ft_norm_constraint": None, "ft_lr": 1e-3, "lora_steps": 10}))
    argv = ["edit", "--model", str(tiny_qwen2_path), "--method", method, "--layers", "1", "2", "--v-steps", "1"]
    argv += ["--question", "What is Velmora known for?", "--answer", "Velmora is a port city."]
    assert cli.main([*argv, "--preset", str(preset), "--max-new-tokens", "4", "--json", "--out", str(tmp_path)]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert row["method"] == method and row["nll_post"] < row["nll_pre"]
    update = WeightUpdate.load(tmp_path / "updates" / "cli-0.safetensors")
    assert update.backend == method and update.params


# ---------------------------------------------------------------------------- the workflow


def _config(**extra) -> dict:
    config = copy.deepcopy(TINY)
    config["methods"] = ["muke-memit", "ft", "lora"]
    config["method_hparams"] = {"ft": {"ft_steps": 5, "ft_norm_constraint": None}, "lora": {"lora_steps": 5}}
    config.update(extra)
    return config


def test_the_plan_gives_the_baselines_an_update_that_reads_the_requests(tmp_path, monkeypatch):
    from muke.workflow.job_costs import estimate_plan

    monkeypatch.chdir(make_workdir(tmp_path))
    plan = Plan(_config())
    runs = {r.method: r for r in plan.runs}
    alone = {r.method: r for r in Plan(copy.deepcopy(TINY)).runs}
    assert runs["muke-memit"].specs() == alone["muke-memit"].specs()  # the other methods' jobs as before
    for method in ("ft", "lora"):
        run = runs[method]
        assert run.memories is None and run.stats is None
        assert set(run.update.inputs) == {"model"} and run.update.params["memory"]["objective"] == "one_for_all"
        assert run.update.params["selection"] == run.dataset.selection
    assert runs["ft"].update.params["options"]["steps"] == 5
    moved = {r.method: r for r in Plan(_config(hparams={"v_lr": 2.0})).runs}
    assert moved["ft"].update.identity == runs["ft"].update.identity  # no δ-loop option reaches it
    assert moved["muke-memit"].update.identity != runs["muke-memit"].update.identity
    jobs = {s.stage: s.jobs for s in estimate_plan(plan)}
    assert jobs["optimize_memories"] == 1 and jobs["update_weights"] == 3
    sequential = Plan(_config(editing={"mode": "sequential", "batch_size": 1, "checkpoints": [2]}))
    run = next(r for r in sequential.runs if r.method == "lora")
    assert run.sequence.params["memory"] == runs["lora"].update.params["memory"] and run.stats is None


def _prepared_ft_run(tmp_path, monkeypatch):
    """(workdir, plan, the ft run, its prepared model folder) of the tiny config with the baselines."""
    from muke.workflow.stages.prepare_model import prepare_model

    workdir = make_workdir(tmp_path)
    monkeypatch.chdir(workdir)
    plan = Plan(_config())
    run = next(r for r in plan.runs if r.method == "ft")
    model = workdir / plan.model_dir(run.model)
    prepare_model(json.loads(run.model.spec.to_json()), model)
    return workdir, plan, run, model


def test_the_update_stage_reads_the_requests_of_its_shard(tmp_path, monkeypatch):
    from muke.workflow.stages.common import read_update_index
    from muke.workflow.stages.update_weights import update_weights

    workdir, plan, run, model = _prepared_ft_run(tmp_path, monkeypatch)
    index = workdir / plan.update_path(run, 0)
    spec = json.loads(run.update.to_json())
    update_weights(spec, model, out=index, requests=run.dataset.path, shard=0, device="cpu")
    rows = read_update_index(index)
    assert [r["request_ids"] for r in rows] == [[i] for i in run.dataset.request_ids] and not any(
        r["failed"] for r in rows
    )
    update = WeightUpdate.load(index.with_suffix("") / rows[0]["file"])
    assert update.backend == "ft" and len(update.info["trace"]) <= 5
    with pytest.raises(ValueError, match="--memories or"):
        update_weights(spec, model, out=index, device="cpu")


def test_the_report_lists_a_baselines_failed_update(tmp_path, monkeypatch):
    """A run without δ memories (ft) still has update shards in the report spec, and a batch whose update
    failed shows in the report's failures with the stage and the reason."""
    from muke.eval import tables
    from muke.numerics import NumericalError
    from muke.update import edit as update_edit
    from muke.workflow.report_spec import report_runs
    from muke.workflow.stages.report import _read_shard
    from muke.workflow.stages.update_weights import update_weights

    workdir, plan, run, model = _prepared_ft_run(tmp_path, monkeypatch)
    first = run.dataset.request_ids[0]

    def failing(em, batch, *args, **kwargs):
        if batch[0].id == first:
            raise NumericalError("ft update: loss is nan")
        return compute(em, batch, *args, **kwargs)

    compute = update_edit.compute_update
    monkeypatch.setattr(update_edit, "compute_update", failing)
    update_weights(
        json.loads(run.update.to_json()),
        model,
        out=plan.update_path(run, 0),
        requests=run.dataset.path,
        shard=0,
        device="cpu",
    )
    (spec,) = [r for r in report_runs(plan) if r["method"] == "ft"]
    assert spec["files"]["shards"] == [{"memories": None, "trace": None, "update": plan.update_path(run, 0)}]
    failures = tables.failures([spec], _read_shard)
    assert failures[["id", "stage", "reason"]].values.tolist() == [[first, "update_weights", "ft update: loss is nan"]]
    assert tables.traces([spec]) is None  # no δ traces to read


@needs_snakemake
def test_the_workflow_runs_the_baselines_into_the_report(tmp_path_factory):
    repo = snapshot(tmp_path_factory.mktemp("snapshot") / "repo")
    workdir = make_workdir(tmp_path_factory.mktemp("workflow"), repo)
    config = _config(methods=["ft", "lora"], locality={**TINY["locality"], "edits": 1})
    snakemake(workdir, config, repo=repo)
    results = workdir / TINY["results"]
    metrics = pd.read_parquet(results / "tables" / "edit_metrics.parquet")
    assert set(metrics["method"]) == {"pre-edit", "ft", "lora"}
    assert not (results / "memories").exists()
    locality = pd.read_parquet(results / "tables" / "locality.parquet")
    assert set(locality.loc[locality.model_state == "edited", "method"]) == {"ft", "lora"}
    assert "lora" in (results / "report" / "index.html").read_text()
