"""The paper presets follow the authors' code where their hparams files differ from the paper's text:
Llama-3's μKE (UnKE) runs 50 δ steps (μKE (MEMIT) 25), and qwen2 statistics documents stop at 4,096 tokens."""

from pathlib import Path

import pytest

from muke.workflow import hparams as hp
from muke.workflow.plan import Plan

REPO = Path(__file__).resolve().parent.parent


def plan(preset: str, **config) -> Plan:
    return Plan(
        {
            "models": {"m": {"preset": preset}},
            "datasets": {"demo": {"path": str(REPO / "resources" / "demo_edits.jsonl"), "limit": 1}},
            "methods": ["muke-unke", "muke-memit"],
            "locality": {"enabled": False},
            **config,
        }
    )


def memory(p: Plan, method: str) -> dict:
    return next(r for r in p.runs if r.method == method).memories.params["memory"]


def test_llama3_muke_unke_runs_the_authors_50_delta_steps():
    p = plan("llama-3-8b-instruct")
    assert memory(p, "muke-unke")["v_num_grad_steps"] == 50
    assert memory(p, "muke-memit")["v_num_grad_steps"] == 25
    fixed, _ = hp.resolve(hp.levels(p.config, p.models["m"], "muke-unke"))
    assert fixed["v_num_grad_steps"].source.startswith("method_hparams.muke-unke.v_num_grad_steps (preset ")
    fixed, _ = hp.resolve(hp.levels(p.config, p.models["m"], None))  # the unedited model: no method level
    assert fixed["v_num_grad_steps"].value == 25


@pytest.mark.parametrize("level", ["hparams", "models"])
def test_a_config_value_overrides_the_presets_method_value(level):
    over = {"v_num_grad_steps": 30}
    config = (
        {"hparams": over}
        if level == "hparams"
        else {"models": {"m": {"preset": "llama-3-8b-instruct", "hparams": over}}}
    )
    p = plan("llama-3-8b-instruct", **config)
    assert memory(p, "muke-unke")["v_num_grad_steps"] == memory(p, "muke-memit")["v_num_grad_steps"] == 30


def test_qwen2_statistics_stop_at_4096_tokens_and_llama3_at_8192():
    for preset, tokens in (("qwen2.5-7b-instruct", 4096), ("llama-3-8b-instruct", 8192)):
        run = next(r for r in plan(preset).runs if r.method == "muke-memit")
        assert run.stats.params["max_length"] == tokens


def test_the_presets_say_which_lambda_order_runs():
    for preset in ("qwen2.5-7b-instruct", "llama-3-8b-instruct"):
        assert memory(plan(preset), "muke-memit")["lambda_order"] == "reference"
