"""The locality stage with retention (muke.eval.retention) on the tiny model: the rows it writes for the
unedited and the edited models, and what enters the locality spec's identity."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from muke.io import write_json, write_parquet
from muke.update.weights import WeightUpdate
from muke.workflow.config import ConfigError
from muke.workflow.plan import Plan
from muke.workflow.stages.common import MODEL_REF
from muke.workflow.stages.locality import RETENTION_ANSWERS, locality

REPO = Path(__file__).resolve().parent.parent
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
SMALL = {"enabled": True, "n_questions": 3, "max_new_tokens": 6, "texts": 2, "max_length": 48}
ANSWER_METRICS = {"answer_char_bleu", "answer_word_bleu", "answer_exact_match", "prefix_exact_match"}
KINDS = ["question", "instruction", "code"]  # the first three default prompts
PER_KIND = {("retention", f"{m} ({k})") for k in KINDS for m in ("first_token_agreement", "prefix_exact_match")}


def make_plan(tmp_path, monkeypatch, tasks=(), edits=1, **retention) -> Plan:
    """The tiny config (muke-memit only) run from tmp_path, with small retention settings."""
    monkeypatch.chdir(tmp_path)
    if not (tmp_path / "resources").exists():
        (tmp_path / "resources").symlink_to(REPO / "resources")
    loc = {
        **copy.deepcopy(TINY["locality"]),
        "tasks": list(tasks),
        "limit": 2,
        "edits": edits,
        "num_fewshot": 0,
        "retention": {**SMALL, **retention},
    }
    return Plan({**copy.deepcopy(TINY), "methods": ["muke-memit"], "locality": loc})


def as_spec(s) -> dict:
    return json.loads(s.to_json())


@pytest.fixture()
def model_dir(tmp_path, tiny_qwen2_path):
    write_json(tmp_path / "model" / MODEL_REF, {"path": str(tiny_qwen2_path)})
    return tmp_path / "model"


def write_updates(index: Path, request_ids: list[str], shape: tuple[int, int], scale: float) -> Path:
    """An update_weights index with one hand-made low-rank ΔW = U Vᵀ of `shape` (layer 1) per request."""
    rows = []
    for k, rid in enumerate(request_ids):
        g = torch.Generator().manual_seed(k)
        U, V = scale * torch.randn(shape[0], 2, generator=g), torch.randn(shape[1], 2, generator=g) / shape[1] ** 0.5
        WeightUpdate("muke-memit", "memit", [1], [rid], factors={1: (U, V)}).save(
            index.with_suffix("") / f"{k:04d}.safetensors"
        )
        rows.append(
            {
                "batch": k,
                "file": f"{k:04d}.safetensors",
                "request_ids": json.dumps([rid]),
                "failed": False,
                "seconds": 0.0,
                "reason": None,
            }
        )
    return write_parquet(pd.DataFrame(rows), index)


def rows_of(df: pd.DataFrame, state: str, request_id=None) -> dict:
    sel = df[(df.model_state == state) & (df.request_id.isna() if request_id is None else df.request_id == request_id)]
    return {(r.task, r.metric): r for r in sel.itertuples()}


def test_pre_edit_and_edited_rows(tmp_path, monkeypatch, model_dir, tiny_qwen2_path):
    from muke.model import load

    shape = tuple(load(tiny_qwen2_path).down_proj_weight(1).shape)
    plan = make_plan(tmp_path, monkeypatch, edits=2)
    (run,) = [r for r in plan.runs if r.locality is not None]
    pre_out = Path(plan.locality_path(None, plan.models["tiny"]))
    locality(as_spec(plan.pre_edit_locality["tiny"]), model_dir, pre_out, device="cpu")
    pre = rows_of(pd.read_parquet(pre_out), "pre-edit")
    answer_shift = {("retention", "first_token_agreement"), ("retention", "token_agreement")}
    answer_shift |= {("text_shift", "first_token_kl"), ("text_shift", "answer_kl")}
    assert (
        set(pre)
        == {("retention", m) for m in ANSWER_METRICS}
        | {("text_shift", "kl"), ("text_shift", "ppl")}
        | answer_shift
        | PER_KIND
    )
    assert all(pre[k].value == (1 if k[0] == "retention" else 0) for k in answer_shift)
    assert pre["retention", "first_token_agreement"].n_samples == 3
    assert all(
        pre["retention", m].value == pytest.approx(1) and pre["retention", m].n_samples == 3 for m in ANSWER_METRICS
    )
    assert all(row.n_models == 1 for row in pre.values())
    assert pre["text_shift", "kl"].value == 0 and pre["text_shift", "ppl"].value > 1
    answers = pd.read_parquet(pre_out.parent / RETENTION_ANSWERS)
    assert (
        len(answers) == 3
        and (answers["pre"] == answers["post"]).all()
        and answers["id"].tolist() == ["p-q00", "p-i00", "p-c00"]
        and answers["kind"].tolist() == KINDS
        and answers["prefix_exact"].all()
    )

    index = write_updates(Path(plan.update_path(run, 0)), ["demo-00", "demo-01"], shape, scale=20.0)
    out = Path(plan.locality_path(run))
    locality(as_spec(run.locality), model_dir, out, updates=[index], device="cpu")
    df = pd.read_parquet(out)
    assert list(df.columns) == [
        "model_state",
        "request_id",
        "task",
        "metric",
        "value",
        "stderr",
        "n_samples",
        "n_models",
    ]
    per_edit = [rows_of(df, "edited", rid) for rid in ("demo-00", "demo-01")]
    for rows in per_edit:
        assert set(rows) == set(pre)
        assert (
            rows["text_shift", "kl"].value > 1e-3 and rows["text_shift", "ppl"].value != pre["text_shift", "ppl"].value
        )
        assert rows["text_shift", "kl"].n_samples == pre["text_shift", "kl"].n_samples > 0  # tokens
        assert all(0 <= rows["retention", m].value <= 1 and rows["retention", m].n_samples == 3 for m in ANSWER_METRICS)
        assert rows["text_shift", "first_token_kl"].value > 0 and rows["retention", "token_agreement"].value < 1
    assert min(rows["retention", "answer_char_bleu"].value for rows in per_edit) < 1  # the edit changed an answer
    mean = rows_of(df, "edited")
    for key, row in mean.items():
        assert row.n_models == 2 and row.n_samples == per_edit[0][key].n_samples
        assert row.value == pytest.approx(sum(r[key].value for r in per_edit) / 2)
        assert row.stderr is not None and not math.isnan(row.stderr)
    answers = pd.read_parquet(out.parent / RETENTION_ANSWERS)
    assert len(answers) == 6 and set(answers["request_id"]) == {"demo-00", "demo-01"}
    assert (answers.groupby("id")["pre"].nunique() == 1).all()  # one reference for every edit


def test_without_retention_and_beside_lm_eval(tmp_path, monkeypatch, model_dir):
    """Off: no retention rows, no answers file, only lm-eval's; on beside a task: both."""
    off = make_plan(tmp_path, monkeypatch, tasks=["muke_mmlu_demo"], enabled=False)
    assert off.pre_edit_locality["tiny"].params["retention"] == {"enabled": False}
    out = tmp_path / "off" / "locality.parquet"
    locality(as_spec(off.pre_edit_locality["tiny"]), model_dir, out, device="cpu")
    df = pd.read_parquet(out)
    assert set(df["task"]) == {"muke_mmlu_demo"} and not (out.parent / RETENTION_ANSWERS).exists()
    on = make_plan(tmp_path, monkeypatch, tasks=["muke_mmlu_demo"], n_questions=1, max_new_tokens=2, texts=1)
    out = tmp_path / "on" / "locality.parquet"
    locality(as_spec(on.pre_edit_locality["tiny"]), model_dir, out, device="cpu")
    df = pd.read_parquet(out)
    assert set(df["task"]) == {"muke_mmlu_demo", "retention", "text_shift"} and (df["model_state"] == "pre-edit").all()


def test_the_files_enter_the_identity_by_content(tmp_path, monkeypatch):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"id": "q0", "question": "Why is the sky blue?"}) + "\n")

    def identities(**retention):
        plan = make_plan(tmp_path, monkeypatch, **{"questions": str(questions), **retention})
        (run,) = [r for r in plan.runs if r.locality is not None]
        return plan.pre_edit_locality["tiny"].identity, run.locality.identity, run.generate.identity

    before = identities()
    assert identities() == before
    questions.write_text(questions.read_text() + json.dumps({"id": "q1", "question": "What is rain?"}) + "\n")
    changed = identities()
    assert changed[0] != before[0] and changed[1] != before[1] and changed[2] == before[2]
    assert identities(max_new_tokens=7)[:2] != changed[:2]
    texts = tmp_path / "texts.txt"
    texts.write_text("One held-out text.\n\nAnother one.\n")
    assert identities(text_file=str(texts))[:2] != changed[:2]
    off = identities(enabled=False)
    assert identities(enabled=False, max_new_tokens=7) == off and off[:2] != changed[:2]
    with pytest.raises(ConfigError, match="locality.retention.questions"):
        identities(questions="missing.jsonl")


def test_a_killed_job_resumes_after_the_edits_it_finished(tmp_path, monkeypatch, model_dir, tiny_qwen2_path):
    """Killed while evaluating the second edited model, the job keeps the first one's rows in a part file; the
    rerun evaluates only the second, and its table equals an uninterrupted run's."""
    import muke.update.weights
    from muke.model import load

    shape = tuple(load(tiny_qwen2_path).down_proj_weight(1).shape)
    plan = make_plan(tmp_path, monkeypatch, edits=2, n_questions=2, max_new_tokens=4, texts=1, max_length=24)
    (run,) = [r for r in plan.runs if r.locality is not None]
    index = write_updates(Path(plan.update_path(run, 0)), ["demo-00", "demo-01"], shape, scale=20.0)
    whole = tmp_path / "whole" / "locality.parquet"
    locality(as_spec(run.locality), model_dir, whole, updates=[index], device="cpu")

    real, loaded = muke.update.weights.WeightUpdate.load, []

    def load_then_die(path):
        loaded.append(Path(path).name)
        if len(loaded) == 2:
            raise KeyboardInterrupt("SLURM time limit")
        return real(path)

    monkeypatch.setattr(muke.update.weights.WeightUpdate, "load", staticmethod(load_then_die))
    out = tmp_path / "resumed" / "locality.parquet"
    with pytest.raises(KeyboardInterrupt):
        locality(as_spec(run.locality), model_dir, out, updates=[index], device="cpu")
    assert not out.exists() and [p.name for p in (out.parent / "locality.parts").iterdir()] == ["00000.json"]
    loaded.clear()
    monkeypatch.setattr(muke.update.weights.WeightUpdate, "load", staticmethod(lambda p: loaded.append(p) or real(p)))
    locality(as_spec(run.locality), model_dir, out, updates=[index], device="cpu")
    assert [Path(p).name for p in loaded] == ["0001.safetensors"]  # only the edit that had not finished
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(whole))
    pd.testing.assert_frame_equal(
        pd.read_parquet(out.parent / RETENTION_ANSWERS), pd.read_parquet(whole.parent / RETENTION_ANSWERS)
    )
    assert not (out.parent / "locality.parts").exists()
