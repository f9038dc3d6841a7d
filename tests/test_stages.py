"""Workflow stages called in-process: atomic outputs and resumption of a shard killed midway."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

import muke.workflow.stages.optimize_memories as MEMORIES
from muke.io import atomic_path, write_json, write_parquet
from muke.workflow.plan import Plan
from muke.workflow.stages.collect_stats import collect_stats
from muke.workflow.stages.common import MODEL_REF, model_path, read_memories, read_update_index
from muke.workflow.stages.optimize_memories import optimize_memories
from muke.workflow.stages.prepare_model import prepare_model
from muke.workflow.stages.report import report
from muke.workflow.stages.score import score
from muke.workflow.stages.update_weights import update_weights

REPO = Path(__file__).resolve().parent.parent
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())


def tiny_plan(tmp_path, monkeypatch, **config) -> Plan:
    """The tiny config's plan for muke-memit, run from tmp_path; `config` replaces top-level keys."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resources").symlink_to(REPO / "resources")
    return Plan({**copy.deepcopy(TINY), "methods": ["muke-memit"], **config})


@pytest.fixture()
def plan(tmp_path, monkeypatch):
    return tiny_plan(tmp_path, monkeypatch)


def spec(s):
    return json.loads(s.to_json())


def test_atomic_writes_leave_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_prepare_model_references_a_local_folder(tmp_path, tiny_qwen2_path, monkeypatch):
    plan = tiny_plan(tmp_path, monkeypatch, models={"mine": {"preset": "tiny", "source": str(tiny_qwen2_path)}})
    model = plan.models["mine"]
    out = prepare_model(spec(model.spec), tmp_path / "models" / model.id)
    assert model_path(out) == str(tiny_qwen2_path)
    assert json.loads((out / "manifest.json").read_text())["identity"] == model.spec.identity


def test_optimize_memories_resumes_a_killed_shard(tiny_qwen2_path, tmp_path, monkeypatch):
    hparams = {**TINY.get("hparams", {}), "delta_batch_size": 1}  # one request per δ batch: killed between them
    plan = tiny_plan(tmp_path, monkeypatch, hparams=hparams)
    run = next(r for r in plan.runs if r.method == "muke-memit")
    model_dir = tmp_path / "model"
    write_json(model_dir / MODEL_REF, {"path": str(tiny_qwen2_path)})
    out, trace = Path(plan.memories_path(run, 0)), Path(plan.memories_path(run, 0)).with_suffix(".trace.parquet")
    calls, real = [], MEMORIES._optimise_many

    def killed_after_one(em, requests, cfg):
        if calls:
            raise KeyboardInterrupt("the job is killed")
        calls.extend(r.id for r in requests)
        return real(em, requests, cfg)

    monkeypatch.setattr(MEMORIES, "_optimise_many", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        optimize_memories(spec(run.memories), model_dir, "resources/demo_edits.jsonl", 0, out, trace, "cpu")
    assert not out.exists() and len(list(out.with_name("shard0.parts").iterdir())) == 1

    calls.clear()
    monkeypatch.setattr(
        MEMORIES,
        "_optimise_many",
        lambda em, requests, cfg: (calls.extend(r.id for r in requests), real(em, requests, cfg))[1],
    )
    optimize_memories(spec(run.memories), model_dir, "resources/demo_edits.jsonl", 0, out, trace, "cpu")
    assert calls == ["demo-01"]  # demo-00 came from its part file
    meta, tensors = read_memories(out)
    assert [r["id"] for r in meta["requests"]] == ["demo-00", "demo-01"]
    assert tensors["0.z"].shape[1] == 128 and not out.with_name("shard0.parts").exists()

    # a part file of another identity (other settings) is not trusted
    other = {**spec(run.memories), "identity": "0000000000"}
    assert MEMORIES._read_part(out.with_name("x.safetensors"), other["identity"]) is None

    # the update stage resumes per batch too
    stats_path = Path(plan.stats_path(run.model, run.stats))
    collect_stats(spec(run.stats), model_dir, plan.stats_corpus(run.stats), stats_path, device="cpu")
    index = Path(plan.update_path(run, 0))
    update_weights(spec(run.update), model_dir, out, index, stats=stats_path, device="cpu")
    first = {p.name: p.stat().st_mtime_ns for p in index.with_suffix("").iterdir()}
    assert sorted(first) == ["0000.safetensors", "0001.safetensors"]
    os.remove(index)
    update_weights(spec(run.update), model_dir, out, index, stats=stats_path, device="cpu")
    assert {p.name: p.stat().st_mtime_ns for p in index.with_suffix("").iterdir()} == first
    rows = read_update_index(index)
    assert [r["request_ids"] for r in rows] == [["demo-00"], ["demo-01"]]


def test_optimize_memories_in_batches_equals_one_by_one(tiny_qwen2_path, tmp_path, monkeypatch):
    """hparams.delta_batch_size 2: the shard's two requests share their δ loops' passes; same memories."""
    plan = tiny_plan(tmp_path, monkeypatch, sweep={"delta_batch_size": [1, 2]})
    runs = sorted((r for r in plan.runs if r.method == "muke-memit"), key=lambda r: r.memories.params["batch"])
    assert [r.memories.params["batch"] for r in runs] == [1, 2] and runs[0].memories.identity != runs[
        1
    ].memories.identity
    model_dir = tmp_path / "model"
    write_json(model_dir / MODEL_REF, {"path": str(tiny_qwen2_path)})
    sizes, real = [], MEMORIES._optimise_many
    monkeypatch.setattr(
        MEMORIES, "_optimise_many", lambda em, requests, cfg: (sizes.append(len(requests)), real(em, requests, cfg))[1]
    )
    results = []
    for run in runs:
        out = Path(plan.memories_path(run, 0))
        optimize_memories(
            spec(run.memories),
            model_dir,
            "resources/demo_edits.jsonl",
            0,
            out,
            out.with_suffix(".trace.parquet"),
            "cpu",
        )
        results.append(read_memories(out))
    assert sizes == [1, 1, 2]
    (meta1, t1), (meta2, t2) = results
    assert [r["id"] for r in meta1["requests"]] == [r["id"] for r in meta2["requests"]] == ["demo-00", "demo-01"]
    assert [r["lambdas"] for r in meta1["requests"]] == [r["lambdas"] for r in meta2["requests"]]
    for i in range(2):
        assert torch.allclose(t1[f"{i}.z"], t2[f"{i}.z"], rtol=1e-5, atol=1e-5)


def test_stages_compute_what_update_edit_computes(plan, tiny_qwen2_path, tmp_path):
    """optimize_memories → files → update_weights gives the delta of muke.update.edit in one process."""
    import torch

    from muke.data import load_requests_checked
    from muke.model import load
    from muke.update.edit import edit
    from muke.update.stats import load_stats
    from muke.update.weights import WeightUpdate

    run = next(r for r in plan.runs if r.method == "muke-memit")
    model_dir = tmp_path / "model"
    write_json(model_dir / MODEL_REF, {"path": str(tiny_qwen2_path)})
    memories = Path(plan.memories_path(run, 0))
    optimize_memories(
        spec(run.memories),
        model_dir,
        "resources/demo_edits.jsonl",
        0,
        memories,
        memories.with_suffix(".trace.parquet"),
        "cpu",
    )
    stats_path = Path(plan.stats_path(run.model, run.stats))
    collect_stats(spec(run.stats), model_dir, plan.stats_corpus(run.stats), stats_path, device="cpu")
    index = Path(plan.update_path(run, 0))
    update_weights(spec(run.update), model_dir, memories, index, stats=stats_path, device="cpu")
    staged = WeightUpdate.load(read_update_index(index)[0]["path"])

    em = load(tiny_qwen2_path)
    request = load_requests_checked("resources/demo_edits.jsonl", "jsonl")[0][0]
    direct, _ = edit(
        em, [request], "muke-memit", run.hparams, load_stats(stats_path, em, run.update.params["options"]["layers"])
    )
    assert staged.request_ids == direct.request_ids == [request.id]
    for layer in direct.factors:
        # the stage batches the shard's δ loops (delta_batch_size auto), edit() has one request: fp rounding apart
        torch.testing.assert_close(staged.dense(layer), direct.dense(layer), rtol=1e-4, atol=1e-5)


def _report_inputs(plan, model_dir, families=("paper",)):
    """The files the report reads, made for every run of `plan`: generations scored by the real score
    stage; hand-made δ shards (demo-01 failed), traces, update indexes, locality results, benchmarks."""
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from muke.data import load_requests_checked

    requests = load_requests_checked("resources/demo_edits.jsonl", "jsonl")[0][:2]
    for k, run in enumerate(plan.runs):
        rows = [
            dict(
                id=r.id,
                kind=kind,
                index=0,
                prompt=r.question,
                output=r.answer[: 20 * (k + i + 1)],
                target=r.answer,
                tokens=8,
                seconds=0.1,
                edit_failed=False,
                shard=0,
            )
            for i, r in enumerate(requests)
            for kind in ("question", "para_question")
        ]
        generations = Path(plan.generate_path(run, 0))
        write_parquet(pd.DataFrame(rows), generations)
        score_spec = spec(run.score)
        score_spec["params"]["families"] = list(families)
        paths = plan.score_paths(run)
        score(score_spec, [generations], paths["samples"], paths["summary"], model_dir, device="cpu")
        if run.memories is None:
            continue
        records = [
            {"index": 0, "id": "demo-00", "failed": False},
            {"index": 1, "id": "demo-01", "failed": True, "error": "δ loss is NaN at step 3"},
        ]
        memories = Path(plan.memories_path(run, 0))
        memories.parent.mkdir(parents=True, exist_ok=True)
        skipped = [
            {
                "record": 7,
                "line": 8,
                "id": None,
                "field": "answer",
                "reason": "missing",
                "message": "demo_edits.jsonl record 7: answer is missing",
                "check": "file",
            }
        ]
        save_file({"empty": torch.zeros(0)}, memories, {"muke": json.dumps({"requests": records, "skipped": skipped})})
        write_parquet(
            pd.DataFrame(
                [
                    {"id": "demo-00", "window": w, "step": s, "loss": 4.0 * 0.7**s + w}
                    for w in range(2)
                    for s in range(6)
                ]
            ),
            plan.trace_path(run, 0),
        )
        write_parquet(
            pd.DataFrame(
                [
                    {
                        "batch": -1,
                        "file": None,
                        "request_ids": '["demo-01"]',
                        "failed": True,
                        "seconds": 0.0,
                        "reason": "δ loss is NaN at step 3",
                    },
                    {
                        "batch": 0,
                        "file": "0000.safetensors",
                        "request_ids": '["demo-00"]',
                        "failed": False,
                        "seconds": 1.0,
                        "reason": None,
                    },
                ]
            ),
            plan.update_path(run, 0),
        )
    localities = [(plan.locality_path(r), "edited", 0.5) for r in plan.runs if r.locality is not None]
    localities += [(plan.locality_path(None, plan.models["tiny"]), "pre-edit", 0.6)]
    for path, state, value in localities:
        write_parquet(
            pd.DataFrame(
                [
                    {
                        "model_state": state,
                        "request_id": None,
                        "task": "muke_mmlu_demo",
                        "metric": "acc",
                        "value": value,
                        "stderr": 0.01,
                        "n": 1,
                    }
                ]
            ),
            path,
        )
    bench = Path(plan.results) / "benchmarks" / "generate"
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for name, seconds in ((Path(plan.generate_path(plan.runs[0], 0)).parent.name, 12.5), ("pre-edit-0000000000", 99.0)):
        (bench / name).mkdir(parents=True)
        (bench / name / "shard0.tsv").write_text(header + f"{seconds}\t0:00:12\t321.5\t1\t1\t1\t0\t0\t90\t11\n")


def test_report_stage_writes_tables_and_the_full_report(tmp_path, monkeypatch, tiny_qwen2_path):
    """score → report on the plan of a v_num_grad_steps sweep: the tables, the paper's figures
    (BLEU vs target length, metrics vs the swept value), δ traces, failures and the reproducibility record."""
    import hashlib

    import pandas as pd
    from transformers import AutoTokenizer

    plan = tiny_plan(tmp_path, monkeypatch, sweep={"v_num_grad_steps": [2, 4]})
    model_dir = tmp_path / "model"
    write_json(model_dir / MODEL_REF, {"path": str(tiny_qwen2_path)})
    _report_inputs(plan, model_dir)

    samples = pd.read_parquet(plan.score_paths(plan.runs[0])["samples"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_path)
    assert samples["target_tokens"].tolist() == [
        len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in samples["target"]
    ]

    tables = tmp_path / "tables"
    html = report(
        json.loads(plan.report_spec()),
        tables / "edit_metrics.parquet",
        tables / "locality.parquet",
        tmp_path / "report" / "index.html",
    )
    edit = pd.read_parquet(tables / "edit_metrics.parquet")
    assert len(edit) == 3 * 2 and set(edit["method"]) == {"pre-edit", "muke-memit"}  # runs × kinds, paper family
    assert set(edit["sweep_value"].dropna()) == {"2", "4"} and (edit["n"] == 2).all()
    assert len(pd.read_csv(tables / "edit_metrics.csv")) == len(edit)
    locality = pd.read_parquet(tables / "locality.parquet")
    assert sorted(locality["model_state"]) == ["edited", "edited", "pre-edit"]

    text = html.read_text()
    assert "paper family" in text and "Locality (Table 2)" in text and "muke_mmlu_demo" in text
    assert "<img alt='BLEU vs target length (paper Fig. 5)'" in text
    assert "<img alt='Metrics vs v_num_grad_steps (paper Fig. 6)'" in text and "v_num_grad_steps=4" in text
    assert "<img alt='δ-loss traces'" in text
    failures = pd.read_csv(html.parent / "failures.csv")  # per swept run: demo-01 and a skipped record
    assert sorted(failures["stage"]) == ["data", "data", "optimize_memories", "optimize_memories"]
    assert "Failed requests: <b>4</b>" in text and "δ loss is NaN at step 3" in text and "answer is missing" in text
    repro = text[text.index("id='repro'") :]
    assert "git commit" in repro and "v_num_grad_steps" in repro
    for run in plan.runs:
        assert run.score.identity in repro and run.generate.identity in repro
    assert hashlib.sha256((REPO / "resources" / "demo_edits.jsonl").read_bytes()).hexdigest() in repro
    assert "12.50" in repro and "99.00" not in repro  # benchmarks of this plan's jobs only
    assert (html.parent / "stage_identities.csv").is_file()


def test_stage_commands_take_their_options_from_the_stage_signatures():
    """`muke stage <name>`: one subcommand per stage function, its parameters the options (as the rules pass them)."""
    from muke.cli import build_parser

    parse = build_parser().parse_args
    args = parse(
        [
            "stage",
            "update-weights",
            "--spec",
            '{"a": 1}',
            "--model",
            "m",
            "--memories",
            "z",
            "--out",
            "o",
            "--stats",
            "s",
            "--cache-dir",
            "c",
            "--threads",
            "2",
        ]
    )
    assert args.stage_function is update_weights and args.spec == {"a": 1}
    assert (args.stats, args.preservation, args.cache_dir, args.device, args.threads) == ("s", None, "c", "auto", 2)
    args = parse(
        [
            "stage",
            "score",
            "--spec",
            "{}",
            "--generations",
            "a",
            "b",
            "--samples",
            "x",
            "--summary",
            "y",
            "--model",
            "m",
        ]
    )
    assert args.generations == ["a", "b"] and args.stage_function is score
    args = parse(["stage", "locality", "--spec", "{}", "--model", "m", "--out", "o", "--updates"])
    assert list(args.updates) == []
    args = parse(
        [
            "stage",
            "collect-stats",
            "--spec",
            "{}",
            "--model",
            "m",
            "--corpus",
            "c",
            "--out",
            "o",
            "--checkpoint-every",
            "8",
        ]
    )
    assert args.checkpoint_every == 8
    args = parse(
        [
            "stage",
            "optimize-memories",
            "--spec",
            "{}",
            "--model",
            "m",
            "--requests",
            "r",
            "--shard",
            "1",
            "--out",
            "o",
            "--trace",
            "t",
        ]
    )
    assert args.shard == 1
    with pytest.raises(SystemExit):
        parse(["stage", "report", "--spec", "{}", "--metrics", "m.parquet"])  # --locality, --html missing
