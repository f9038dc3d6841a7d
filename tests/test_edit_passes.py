"""Edit passes (hparams.edit_passes; muke.update.edit.further_passes, docs/ALGORITHM.md §5): a further pass
re-optimises the memories on the edited model and completes an update that fell short; nothing moves, no pass;
where the option is refused, and what it moves in the workflow."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from muke.data import EditRequest
from muke.engine.memory import MemoryConfig, optimise
from muke.engine.windows import encode
from muke.update.edit import compute_update, target_nll, window_check
from muke.update.keys import Target
from muke.update.methods import resolve_method
from muke.update.sequential import edit_sequence
from muke.update.stats import StatsConfig, collect_stats, load_stats
from muke.update.weights import WeightUpdate, apply
from muke.workflow.plan import Plan
from tests.test_workflow import TINY, make_workdir

QUESTION = "What is the Velmora tide clock?"
ANSWER = "The Velmora tide clock is a bronze machine in the harbour tower."
# one-token windows: the tiny model's δ loop makes almost every one reproduce (an 8-token window: none)
MEMORY = {"layer": 2, "objective": "window", "window": 1, "v_lr": 0.5, "v_num_grad_steps": 40, "v_stop_prob": 0.5}
# a preservation weight at which one update realises about half of the windows (8 of 17)
UPDATE = {"backend": "memit", "layers": [1, 2], "mom2_update_weight": 300.0}


@pytest.fixture(scope="module")
def stats(pretrained_tiny, tmp_path_factory, request):
    corpus = str(request.config.rootpath / "resources/demo_corpus.txt")
    cfg = StatsConfig(layers=(1, 2), corpus=corpus, max_docs=50)
    path = collect_stats(pretrained_tiny, cfg, tmp_path_factory.mktemp("s") / "s.safetensors", False)
    return load_stats(path, pretrained_tiny, [1, 2])


@pytest.fixture(scope="module")
def target(pretrained_tiny):
    em = pretrained_tiny
    seq = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, MEMORY["window"])
    return Target("velmora", seq, optimise(em, seq, MemoryConfig(**MEMORY)).z)


def reproduced_windows(em, seq, update) -> int:
    """Windows whose tokens the model with `update` applied already reproduces (their δ loop stops at step 0)."""
    with apply(em, update):
        trace = optimise(em, seq, MemoryConfig(**MEMORY)).trace
    return sum(1 for w in {r["window"] for r in trace} if max(r["step"] for r in trace if r["window"] == w) == 0)


def test_a_second_pass_completes_an_update_that_fell_short(pretrained_tiny, stats, target):
    em, seq = pretrained_tiny, target.seq
    one = compute_update(em, [target], stats=stats, **UPDATE)
    three = compute_update(em, [target], stats=stats, memory=MEMORY, edit_passes=3, **UPDATE)
    assert "passes" not in one.info
    moved = [p["moved_windows"] for p in three.info["passes"]]
    assert moved[0] > 1 and len(moved) == 2, three.info["passes"]
    n = seq.n_windows
    for layer, (U, V) in one.factors.items():  # pass 1 is the one-pass update, the passes' factors beside it
        assert torch.equal(three.factors[layer][0][:, :n], U) and torch.equal(three.factors[layer][1][:, :n], V)
        assert three.factors[layer][0].shape[1] == n * (1 + sum(1 for m in moved if m))
    with apply(em, one):
        nll_one = target_nll(em, seq)
    with apply(em, three):
        nll_three = target_nll(em, seq)
    assert nll_three < nll_one - 0.05, (nll_one, nll_three)
    assert reproduced_windows(em, seq, three) > reproduced_windows(em, seq, one)
    assert three.request_ids == ["velmora"]
    assert three.info["seconds"] > sum(p["seconds"] for p in three.info["passes"]) > 0  # the δ loops counted too
    assert set(three.keys) == set(one.keys)  # the first pass's edit keys (empty outside a sequence)


def test_an_update_still_short_after_its_last_pass_names_its_windows(pretrained_tiny, stats, target):
    """info["unsettled"]: the windows the final model leaves below the stop probability (the first of them is the
    first window a further pass's δ loop would move: before it every δ is 0, so the loop sees the model as it is)
    and those where greedy decoding leaves the target (the first off-target token)."""
    em = pretrained_tiny
    two = compute_update(em, [target], stats=stats, memory=MEMORY, edit_passes=2, **UPDATE)
    assert two.info["passes"][0]["moved_windows"] > 0
    found = two.info["unsettled"]["velmora"]
    with apply(em, two):
        trace = optimise(em, target.seq, MemoryConfig(**MEMORY)).trace
        assert window_check(em, target.seq, MEMORY["v_stop_prob"]) == (found["short"], found["off_target"])
        answer = em.model.generate(
            target.seq.input_ids[:, : len(target.seq.prompt_ids)],
            max_new_tokens=len(target.seq.target_ids),
            do_sample=False,
        )[0, len(target.seq.prompt_ids) :].tolist()
    moving = sorted({r["window"] for r in trace if r["step"] > 0})
    assert moving and found["short"][0] == moving[0], (moving, found)
    assert set(found["off_target"]) <= set(found["short"]) and len(found["short"]) < target.seq.n_windows
    first_off = next((i for i, (a, b) in enumerate(zip(answer, target.seq.target_ids)) if a != b), None)
    starts = [a for a, _ in target.seq.windows]
    off = [w for w in range(target.seq.n_windows) if first_off is not None and starts[w] <= first_off][-1:]
    assert found["off_target"][:1] == off, (answer, target.seq.target_ids, found)


def test_no_further_pass_runs_when_every_window_reproduces(pretrained_tiny, stats, target):
    """A stop probability every token already has: the second pass moves nothing, the update is pass 1's."""
    em = pretrained_tiny
    one = compute_update(em, [target], stats=stats, **UPDATE)
    loose = {**MEMORY, "v_stop_prob": 1e-9}
    same = compute_update(em, [target], stats=stats, memory=loose, edit_passes=4, **UPDATE)
    assert [p["moved_windows"] for p in same.info["passes"]] == [0] and same.info["unsettled"] == {}
    for layer in one.factors:
        assert all(torch.equal(a, b) for a, b in zip(same.factors[layer], one.factors[layer]))
    with pytest.raises(ValueError, match="memory"):
        compute_update(em, [target], stats=stats, edit_passes=2, **UPDATE)


def test_a_sequence_makes_each_batch_in_passes(pretrained_tiny, stats):
    """SequentialEditor's batches go through compute_update with the δ options: each link is its passes' sum."""
    em = pretrained_tiny
    delta_loop = {k: v for k, v in MEMORY.items() if k not in ("layer", "objective")}
    preset = {**delta_loop, "layers": [1, 2], "mom2_update_weight": 300.0, "edit_passes": 2}
    requests = [EditRequest("velmora", QUESTION, ANSWER), EditRequest("orlan", "Who founded Orlan?", "Mira Tessel.")]
    before = {n: p.detach().clone() for n, p in em.model.named_parameters()}
    chain = edit_sequence(em, [[r] for r in requests], "window+memit", preset, stats)
    assert all(torch.equal(p, before[n]) for n, p in em.model.named_parameters())
    assert [len(link.info["passes"]) for link in chain] == [1, 1]  # edit_passes 2: one further pass at most
    assert chain[0].info["passes"][0]["moved_windows"] > 0
    first = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, 1)
    assert chain[0].factors[2][0].shape[1] == 2 * first.n_windows  # pass 1's factors and pass 2's


def test_recheck_earlier_completes_the_earlier_requests_its_passes_find_short(pretrained_tiny, stats):
    """recheck_earlier: batch 1's passes check request 0 teacher-forced and re-optimise it where it is short (its
    `rechecked` row); the chain ends with request 0 no further from its target than without the re-check, and
    its link stays batch 1's (request ids, edit keys)."""
    em = pretrained_tiny
    delta_loop = {k: v for k, v in MEMORY.items() if k not in ("layer", "objective")}
    preset = {**delta_loop, "layers": [1, 2], "mom2_update_weight": 300.0, "edit_passes": 2}
    requests = [EditRequest("velmora", QUESTION, ANSWER), EditRequest("orlan", "Who founded Orlan?", "Mira Tessel.")]
    first = encode(em.tokenizer, QUESTION, ANSWER, em.end_of_turn, 1)
    short = {}
    for recheck in (False, True):
        chain = edit_sequence(em, [[r] for r in requests], "window+memit", preset, stats, recheck_earlier=recheck)
        with apply(em, chain):
            short[recheck] = window_check(em, first, MEMORY["v_stop_prob"])[0]
        if recheck:
            assert "rechecked" not in chain[0].info["passes"][0]  # no earlier request
            assert chain[1].info["passes"][0]["rechecked"] == ["velmora"]  # short after its own two passes
            assert chain[1].request_ids == ["orlan"]
            assert "velmora" in chain[1].info["unsettled"] or not short[True]
    assert short[False] and len(short[True]) < len(short[False]), short


def test_edit_passes_needs_target_memories_and_is_left_out_at_one():
    _, _, options = resolve_method("muke-memit", {"edit_passes": 1})
    assert "edit_passes" not in options
    assert resolve_method("muke-unke", {"edit_passes": 2})[2]["edit_passes"] == 2
    for method in ("ft", "lora"):
        with pytest.raises(ValueError, match="edit_passes 2"):
            resolve_method(method, {"edit_passes": 2})


def _run(config, method="muke-memit"):
    return next(r for r in Plan(config).runs if r.method == method)


def test_edit_passes_moves_the_update_not_the_memories(tmp_path, monkeypatch):
    """In the plan the passes change the update (with the δ options in its params) and what reads it, never the
    memories; the update stage, run in process on its memories, writes the passes' sum and what they did."""
    from muke.workflow.stages.collect_stats import collect_stats as stats_stage
    from muke.workflow.stages.common import read_update_index
    from muke.workflow.stages.optimize_memories import optimize_memories
    from muke.workflow.stages.prepare_model import prepare_model
    from muke.workflow.stages.update_weights import update_weights

    monkeypatch.chdir(make_workdir(tmp_path))
    config = copy.deepcopy(TINY)
    config["datasets"]["demo"]["limit"] = 1
    config["hparams"] = {"v_stop_prob": 0.5, "v_num_grad_steps": 30, "mom2_update_weight": 3000}
    base = _run(config)
    config["hparams"]["edit_passes"] = 2
    run = _run(config)
    assert run.memories.identity == base.memories.identity and run.stats.identity == base.stats.identity
    assert run.update.identity != base.update.identity and run.generate.identity != base.generate.identity
    assert run.update.params["memory"] == run.memories.params["memory"] and "memory" not in base.update.params
    assert run.update.params["options"]["edit_passes"] == 2

    plan = Plan(config)
    model = Path(plan.model_dir(run.model))
    prepare_model(json.loads(run.model.spec.to_json()), model)
    memories, index = Path(plan.memories_path(run, 0)), Path(plan.update_path(run, 0))
    stats = Path(plan.stats_path(run.model, run.stats))
    trace = memories.with_suffix(".trace.parquet")
    optimize_memories(json.loads(run.memories.to_json()), model, run.dataset.path, 0, memories, trace, "cpu")
    stats_stage(json.loads(run.stats.to_json()), model, plan.stats_corpus(run.stats), stats, device="cpu")
    update_weights(json.loads(run.update.to_json()), model, memories, index, stats=stats, device="cpu")
    (row,) = read_update_index(index)
    update = WeightUpdate.load(index.with_suffix("") / row["file"])
    assert len(update.info["passes"]) >= 1 and update.info["identity"] == run.update.identity
    assert row["unsettled"] == update.info["unsettled"]  # {} or {request id: windows}, through the index
