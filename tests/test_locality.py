"""Locality through lm-eval: the offline demo tasks run, and the in-memory (edited) model is what gets scored."""

import json
import math
from pathlib import Path

import pytest
import torch

from muke.eval.locality import DEMO_TASKS_DIR, aggregate, ensure_punkt_tab, evaluate, result_rows
from muke.model import load

LOCALITY = Path(__file__).resolve().parent.parent / "resources" / "locality"
IFEVAL_METRICS = {"prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc", "inst_level_loose_acc"}


def read_jsonl(name):
    return [json.loads(line) for line in (LOCALITY / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def em(tiny_qwen2_path):
    return load(tiny_qwen2_path)


@pytest.fixture(scope="module")
def punkt():
    try:
        return ensure_punkt_tab()
    except RuntimeError as e:  # no cached copy and no PyPI
        pytest.skip(f"punkt_tab unavailable: {e}")


def test_demo_data_follow_the_schemas():
    for name, n in (("mmlu_demo.jsonl", 30), ("mmlu_demo_dev.jsonl", 5)):
        docs = read_jsonl(name)
        assert len(docs) >= n
        assert all(len(d["choices"]) == 4 and d["answer"] in range(4) and d["question"] and d["subject"] for d in docs)
    assert len(read_jsonl("ifeval_demo.jsonl")) >= 20


def test_ifeval_demo_instructions_are_known_and_checkable(punkt):
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT
    from lm_eval.tasks.ifeval.utils import process_results

    docs = read_jsonl("ifeval_demo.jsonl")
    for doc in docs:
        for instruction, kwargs in zip(doc["instruction_id_list"], doc["kwargs"], strict=True):
            INSTRUCTION_DICT[instruction](instruction).build_description(**kwargs)
    (sentences,) = [d for d in docs if d["instruction_id_list"] == ["length_constraints:number_sentences"]]
    assert process_results(sentences, ["Once upon a time. The end."])["prompt_level_strict_acc"]
    assert not process_results(sentences, ["One. Two. Three. Four. Five. Six."])["prompt_level_strict_acc"]


def test_mmlu_demo_runs(em):
    rows = evaluate(em, ["muke_mmlu_demo"], DEMO_TASKS_DIR, limit=4, model_state="pre-edit")
    (row,) = rows
    assert (row["model_state"], row["task"], row["metric"]) == ("pre-edit", "muke_mmlu_demo", "acc")
    assert row["n_samples"] == 4
    assert 0 <= row["value"] <= 1 and row["stderr"] >= 0


def test_ifeval_demo_runs(em, punkt):
    rows = evaluate(em, ["muke_ifeval_demo"], DEMO_TASKS_DIR, limit=3, gen_kwargs={"max_gen_toks": 8})
    assert {r["metric"] for r in rows} == IFEVAL_METRICS
    assert all(0 <= r["value"] <= 1 and r["n_samples"] == 3 for r in rows)


def test_lm_eval_scores_the_in_memory_model(em):
    """A zeroed final norm makes every logit 0: all choices tie and lm-eval picks "A" for every question."""
    calls = []
    handle = em.model.register_forward_hook(lambda *_: calls.append(1))
    norm = em.final_norm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.zero_()
        (row,) = evaluate(em, ["muke_mmlu_demo"], DEMO_TASKS_DIR, limit=10)
    finally:
        handle.remove()
        with torch.no_grad():
            norm.copy_(saved)
    answers = [d["answer"] for d in read_jsonl("mmlu_demo.jsonl")[:10]]
    assert calls
    assert row["value"] == pytest.approx(answers.count(0) / 10)


def test_result_rows_and_aggregate():
    results = {
        "results": {
            "t": {
                "alias": "t",
                "acc,none": 0.5,
                "acc_stderr,none": 0.1,
                "inst_acc,none": 0.25,
                "inst_acc_stderr,none": "N/A",
                "exact_match,flex": 1.0,
                "exact_match_stderr,flex": 0.0,
            }
        },
        "n-samples": {"t": {"original": 40, "effective": 10}},
    }
    rows = result_rows(results, "pre-edit")
    assert [(r["metric"], r["value"], r["stderr"], r["n_samples"]) for r in rows] == [
        ("acc", 0.5, 0.1, 10),
        ("inst_acc", 0.25, None, 10),
        ("exact_match,flex", 1.0, 0.0, 10),
    ]
    runs = [dict(r, value=v) for r, v in zip([rows[0]] * 3, (0.2, 0.4, 0.6))]
    (agg,) = aggregate(runs, "muke:demo")
    assert agg["model_state"] == "muke:demo" and agg["n_models"] == 3 and agg["n_samples"] == 10
    assert agg["value"] == pytest.approx(0.4) and agg["stderr"] == pytest.approx(0.2 / math.sqrt(3))
    assert aggregate(rows[:1], "x")[0]["stderr"] == 0.1
