"""Decoding protocols: greedy (muke's default) and the paper's (the authors' evaluator: sampling at
temperature 0.001 with the model's own generation config, seeded); the settings that ran reach the
generate job's manifest and the report, with every δ-loop option of each run (the λ order)."""

import copy
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

import muke.eval.generate as G
from muke.engine.memory import MemoryConfig
from muke.eval import tables
from muke.eval.generate import Decoding, answers, greedy
from muke.io import write_json
from muke.model import load
from muke.update.methods import memory_options
from muke.workflow.plan import Plan
from muke.workflow.stages.common import MODEL_REF
from muke.workflow.stages.generate import generate

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is the capital of France?", "Tell me about the Copper Bridge."]


@pytest.fixture(scope="module")
def em(tiny_qwen2_path):
    return load(tiny_qwen2_path)


@pytest.fixture
def qwen_like(em, monkeypatch):
    """The tiny model with Qwen2.5-7B-Instruct's sampling settings in its generation config."""
    for key, value in {"repetition_penalty": 1.05, "top_k": 20, "top_p": 0.8}.items():
        monkeypatch.setattr(em.model.generation_config, key, value)
    return em


def captured_generate(em, monkeypatch) -> list[dict]:
    calls, original = [], em.model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(em.model, "generate", spy)
    return calls


def test_paper_protocol_values_reach_generate(qwen_like, monkeypatch):
    calls = captured_generate(qwen_like, monkeypatch)
    answers(qwen_like, QUESTIONS[:1], max_new_tokens=3, decoding=Decoding("paper"))
    (kwargs,) = calls
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["max_new_tokens"]) == (True, 0.001, 3)
    assert not {"repetition_penalty", "top_k", "top_p"} & set(kwargs)  # the model's generation config's
    assert Decoding("paper", seed=7).settings(qwen_like) == {
        "protocol": "paper",
        "do_sample": True,
        "temperature": 0.001,
        "top_k": 20,
        "top_p": 0.8,
        "repetition_penalty": 1.05,
        "seed": 7,
    }


def test_greedy_stays_the_default_and_ignores_the_models_penalty(qwen_like, monkeypatch):
    calls = captured_generate(qwen_like, monkeypatch)
    greedy(qwen_like, QUESTIONS[:1], max_new_tokens=3)
    answers(qwen_like, QUESTIONS[:1], max_new_tokens=3)
    for kwargs in calls:
        assert (kwargs["do_sample"], kwargs["repetition_penalty"]) == (False, 1.0)
    assert Decoding().settings(qwen_like)["protocol"] == "greedy"


def test_paper_sampling_is_seeded(em, monkeypatch):
    monkeypatch.setattr(G, "PAPER_TEMPERATURE", 5.0)  # draws that differ from seed to seed
    before = torch.get_rng_state()

    def sample(seed):
        return [g.text for g in answers(em, QUESTIONS, max_new_tokens=12, decoding=Decoding("paper", seed=seed))]

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left as it was


def test_an_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="generation protocol 'beam'"):
        Decoding("beam")


def tiny_plan(tmp_path, monkeypatch, **config) -> Plan:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resources").symlink_to(REPO / "resources")
    tiny = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    return Plan({**copy.deepcopy(tiny), **config})


def test_the_protocol_and_every_memory_option_reach_the_specs(tmp_path, monkeypatch):
    paper = tiny_plan(tmp_path, monkeypatch, generation={"max_new_tokens": 8, "protocol": "paper"})
    gen = paper.runs[0].generate.params["generation"]
    assert (gen["protocol"], gen["seed"]) == ("paper", 2024)
    default = Plan(paper.config | {"generation": {"max_new_tokens": 8}})
    assert "seed" not in default.runs[0].generate.params["generation"]  # greedy draws nothing
    assert default.runs[0].generate.identity != paper.runs[0].generate.identity
    by_method = {r.method: r.memories.params["memory"] for r in default.runs if r.memories is not None}
    memory = by_method["muke-memit"]
    # defaults filled in: the spec says what ran; fp32_attention only where autocast reads it, key_position,
    # renderings and memory_noise only where they are not the paper's
    paper_only = {"fp32_attention", "key_position", "renderings", "memory_noise"}
    assert set(memory) == {f.name for f in fields(MemoryConfig)} - paper_only
    assert memory_options({"layer": 1, "autocast": "bfloat16"})["fp32_attention"] is True
    assert memory_options({"layer": 1, "key_position": "question"})["key_position"] == "question"
    assert (memory["lambda_order"], memory["affinity_steps"]) == ("reference", 2)  # muke's default; the preset's
    assert (memory["clamp_norm_factor"], memory["v_weight_decay"], memory["early_stop"]) == (4, 1e-3, 1e-2)
    assert "lambda_order" not in by_method["anyedit-memit"]  # AnyEdit reads no affinities


def test_generate_records_its_decoding_and_host_and_the_report_shows_them(tmp_path, monkeypatch, tiny_qwen2_path):
    plan = tiny_plan(
        tmp_path,
        monkeypatch,
        methods=["muke-memit"],
        generation={"max_new_tokens": 2, "kinds": ["question"], "protocol": "paper", "seed": 5},
    )
    model_dir = tmp_path / "model"
    write_json(model_dir / MODEL_REF, {"path": str(tiny_qwen2_path)})
    pre = next(r for r in plan.runs if r.method == "pre-edit")
    out = Path(plan.generate_path(pre, 0))
    generate(json.loads(pre.generate.to_json()), model_dir, "resources/demo_edits.jsonl", 0, out, device="cpu")
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["decoding"] == {
        "protocol": "paper",
        "do_sample": True,
        "temperature": 0.001,
        "top_k": 50,  # transformers' default: the tiny model's generation config sets none
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "seed": 5,
    }
    assert manifest["host"]["cuda available"] is False and manifest["host"]["hostname"]

    runs = json.loads(plan.report_spec())["runs"]
    settings = tables.run_settings(runs)
    row = settings[settings["method"] == "pre-edit"].iloc[0]
    assert json.loads(row["decoding"])["top_k"] == 50
    edited = settings[settings["method"] == "muke-memit"].iloc[0]
    assert edited["lambda_order"] == "reference" and json.loads(edited["decoding"]) == {"protocol": "paper"}
    hosts = tables.job_hosts(runs)
    assert hosts["stage"].tolist() == ["generate"] and hosts["cuda available"].tolist() == ["False"]
