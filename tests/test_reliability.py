"""Reliability: every fault is injected on purpose and must end in a clear message or a recorded failure.

1. bad edit data (file, record and field named; or skipped and listed), 2. bad config (key named,
before the DAG runs), 3. jobs killed with SIGKILL midway (the rerun finishes, redoes nothing finished,
and its artifact equals an uninterrupted run's), 4. non-finite numbers (the request or batch is
recorded as failed, the others go on), 5. determinism (same config and seed, same bits on CPU),
6. safety (no pickle loading, no remote code unless the config says so, foreign statistics refused),
7. a statistics store shared by concurrent jobs (one computes, the others wait), and checksums (a truncated
or bit-flipped artifact is refused naming it; a damaged store entry is collected again).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import muke.cli as cli
from muke.data import DataError, load_requests_checked, model_problems
from muke.io import ChecksumError, checksum_path, record_sha256, recorded_sha256, sha256, write_json
from muke.model import load
from muke.numerics import NumericalError
from muke.update.stats import StatsError, load_stats, read_metadata
from muke.workflow.plan import ConfigError, Plan
from muke.workflow.stages.collect_stats import collect_stats
from muke.workflow.stages.common import (
    MODEL_REF,
    load_model,
    model_path,
    read_memories,
    read_update_index,
    shard_requests,
)
from muke.workflow.stages.generate import generate
from muke.workflow.stages.optimize_memories import optimize_memories
from muke.workflow.stages.prepare_model import prepare_model
from muke.workflow.stages.score import score
from muke.workflow.stages.update_weights import targets as shard_targets
from muke.workflow.stages.update_weights import update_weights

REPO = Path(__file__).resolve().parent.parent
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
DEMO = "resources/demo_edits.jsonl"
GOOD = {"question": "What is Velmora known for?", "answer": "Velmora is a port city with a copper bridge."}


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_qwen2_path):
    """A working directory (resources/ linked in) and a prepared-model folder of the tiny qwen2 model."""
    root = tmp_path_factory.mktemp("work")
    (root / "resources").symlink_to(REPO / "resources")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        model = root / "model"
        write_json(model / MODEL_REF, {"path": str(tiny_qwen2_path)})
        yield root, model


def config(**changes) -> dict:
    """config/tiny.yaml with μKE-MEMIT only, one request per δ batch (a kill falls between requests; a
    poisoned request fails alone), and top-level values replaced (dicts other than `models` merged one level)."""
    c = copy.deepcopy(TINY)
    c["methods"] = ["muke-memit"]
    c["hparams"] = {**c.get("hparams", {}), "delta_batch_size": 1}
    for key, value in changes.items():
        merge = isinstance(value, dict) and isinstance(c.get(key), dict) and key != "models"
        c[key] = {**c[key], **value} if merge else value
    return c


def spec(s) -> dict:
    return json.loads(s.to_json())


def the_run(plan):
    return next(r for r in plan.runs if r.method != "pre-edit")


def write_jsonl(path: Path, rows) -> Path:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


def run_chain(plan, model) -> dict:
    """Run every per-shard stage of a plan's one run in process (shard 0); returns the output paths."""
    run = the_run(plan)
    out = {
        "memories": Path(plan.memories_path(run, 0)),
        "stats": Path(plan.stats_path(run.model, run.stats)),
        "update": Path(plan.update_path(run, 0)),
        "generate": Path(plan.generate_path(run, 0)),
        **plan.score_paths(run),
    }
    out["trace"] = out["memories"].with_suffix(".trace.parquet")
    optimize_memories(spec(run.memories), model, DEMO, 0, out["memories"], out["trace"], "cpu")
    collect_stats(spec(run.stats), model, plan.stats_corpus(run.stats), out["stats"], device="cpu")
    update_weights(spec(run.update), model, out["memories"], out["update"], stats=out["stats"], device="cpu")
    generate(spec(run.generate), model, DEMO, 0, out["generate"], out["update"], "cpu")
    score(spec(run.score), [out["generate"]], out["samples"], out["summary"], model, device="cpu")
    return out


@pytest.fixture(scope="module")
def clean(work):
    """One uninterrupted run of every per-shard stage (results/clean): the reference of several tests."""
    root, model = work
    plan = Plan(config(results="results/clean"))
    return plan, run_chain(plan, model)


def same_memories(a: Path, b: Path) -> None:
    (meta_a, ta), (meta_b, tb) = read_memories(a), read_memories(b)
    for meta in (meta_a, meta_b):
        for r in meta["requests"]:
            for key in ("seconds", "affinity_seconds"):  # wall-clock times, the one thing allowed to differ
                r.pop(key, None)
    assert meta_a == meta_b
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def same_frames(a: Path, b: Path, drop=("seconds",)) -> None:
    fa, fb = (pd.read_parquet(p).drop(columns=list(drop), errors="ignore") for p in (a, b))
    pd.testing.assert_frame_equal(fa, fb, check_exact=True)


# ---------------------------------------------------------------------------- 1. bad edit data

BAD_FILE = [
    {"id": "a", **GOOD},
    b'{"id": "b", "question": "Q?", "answer": \n',  # record 1: invalid JSON
    {"id": "c", **GOOD},
    {"id": "d", "question": "Where?"},  # record 3: no answer
    {"id": "e", **GOOD},
    {"id": "a", **GOOD},  # record 5: duplicate id
    {"id": "f", **GOOD},
    b'{"id": "g", "question": "Q\xff?", "answer": "x"}\n',  # record 7: not UTF-8
    {"id": "h", "question": "   ", "answer": "x"},  # record 8: empty question
]
BAD_RECORDS = {
    1: (2, None, None, "invalid JSON"),
    3: (4, "d", "answer", "missing"),
    5: (6, "a", "id", "duplicate id"),
    7: (8, None, None, "not UTF-8"),
    8: (9, "h", "question", "must be a non-empty string"),
}


def test_bad_records_stop_the_plan_naming_file_record_and_field(work, tmp_path):
    path = write_jsonl(tmp_path / "edits.jsonl", BAD_FILE)
    with pytest.raises(ConfigError) as e:
        Plan(config(datasets={"demo": {"path": str(path)}}))
    assert f"config key datasets.demo: {path}: record 1 (line 2): invalid JSON" in str(e.value)
    assert "on_bad_record: skip" in str(e.value)
    with pytest.raises(DataError) as e:
        load_requests_checked(tmp_path / "edits.jsonl", "jsonl")
    assert (e.value.record, e.value.line, e.value.field) == (1, 2, None)

    for record, (_, rid, field, reason) in BAD_RECORDS.items():  # each fault alone
        kept = [i for i in range(len(BAD_FILE)) if i not in BAD_RECORDS or i == record]
        alone = write_jsonl(tmp_path / f"only{record}.jsonl", [BAD_FILE[i] for i in kept])
        with pytest.raises(DataError) as e:
            load_requests_checked(alone, "jsonl")
        index = kept.index(record)
        assert str(e.value).startswith(f"{alone}: record {index} (line {index + 1})") and reason in str(e.value)
        assert (e.value.id, e.value.field) == (rid, field)


def test_on_bad_record_skip_lists_each_skipped_record_in_exactly_one_shard(work, tmp_path):
    path = write_jsonl(tmp_path / "edits.jsonl", BAD_FILE)
    plan = Plan(config(datasets={"demo": {"path": str(path), "limit": None, "shard_size": 2, "on_bad_record": "skip"}}))
    dataset = plan.datasets["demo"]
    assert dataset.request_ids == ["a", "c", "e", "f"] and dataset.n_shards == 2
    selection = dataset.selection
    assert selection["on_bad_record"] == "skip"
    listed = []
    for shard in range(dataset.n_shards):
        skipped = []
        chosen = shard_requests(path, selection, shard, skipped)
        assert [r.id for r in chosen] == [["a", "c"], ["e", "f"]][shard]
        listed += [(s["record"], s["line"], s["id"], s["field"]) for s in skipped]
        assert all(s["check"] == "file" and s["reason"] and str(path) in s["message"] for s in skipped)
    assert sorted(listed) == [(r, line, rid, field) for r, (line, rid, field, _) in sorted(BAD_RECORDS.items())]

    # with a limit, the records after the last one used are not listed
    limited = {**selection, "limit": 3}
    skipped = []
    assert [r.id for r in shard_requests(path, limited, 1, skipped)] == ["e"]
    assert [s["record"] for s in skipped] == [3]


def test_ids_and_offset_choose_the_requests_and_only_they_move_the_selection(work, tmp_path):
    rows = [{"id": f"r{i}", **GOOD} for i in range(6)]
    path = write_jsonl(tmp_path / "edits.jsonl", rows)

    def dataset(**entry):
        return Plan(config(datasets={"demo": {"path": str(path), "limit": None, "shard_size": 2, **entry}})).datasets[
            "demo"
        ]

    plain = dataset()
    assert "offset" not in plain.selection and "ids" not in plain.selection  # old configs keep their identity
    windowed = dataset(offset=2, limit=3)
    assert windowed.request_ids == ["r2", "r3", "r4"] and windowed.n_shards == 2
    chosen = dataset(ids=["r5", "r1", "r3"], offset=1)  # file order, then the offset
    assert chosen.request_ids == ["r3", "r5"]
    for d in (windowed, chosen):
        shards = [r.id for s in range(d.n_shards) for r in shard_requests(path, d.selection, s)]
        assert shards == d.request_ids
    assert windowed.selection != plain.selection != chosen.selection
    with pytest.raises(ConfigError, match=r"datasets.demo.ids: .*edits.jsonl: no usable request with id r9"):
        dataset(ids=["r1", "r9"])
    with pytest.raises(ConfigError, match="holds no usable requests"):
        dataset(offset=6)


def test_requests_a_model_cannot_take_are_named_before_any_model_work(work, clean, tmp_path, monkeypatch):
    root, model = work
    em = load(model_path(model))
    long_answer = " ".join(["Velmora"] * 1100)
    path = write_jsonl(
        tmp_path / "edits.jsonl", [{"id": "ok", **GOOD}, {"id": "long", "question": "Q?", "answer": long_answer}]
    )
    requests, _ = load_requests_checked(path, "jsonl")
    (problem,) = model_problems(requests, em.tokenizer, em.context_length, path)
    assert (problem.record, problem.id, problem.field) == (1, "long", "answer")
    assert re.search(
        r"record 1 \(id 'long'\): field 'answer': question \+ answer are \d+ tokens, longer than "
        r"the model's context of 1024 tokens",
        str(problem),
    )

    # a chat template that drops the user's turn: every question templates to nothing
    tokenizer = copy.deepcopy(em.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    fields = [(p.id, p.field) for p in model_problems(requests[:1], tokenizer, 1024, path)]
    assert fields == [("ok", "question")]

    # the stage: on_bad_record error stops before the first δ optimisation ...
    calls = []
    monkeypatch.setattr(
        importlib.import_module("muke.workflow.stages.optimize_memories"),
        "_optimise_many",
        lambda *a: calls.append(a) or pytest.fail("optimised"),
    )
    plan = Plan(config(datasets={"demo": {"path": str(path), "limit": None}}))
    run = the_run(plan)
    out = tmp_path / "d" / "shard0.safetensors"
    with pytest.raises(ValueError, match=r"record 1 \(id 'long'\): field 'answer': question \+ answer"):
        optimize_memories(spec(run.memories), model, path, 0, out, out.with_suffix(".trace.parquet"), "cpu")
    assert not calls and not out.parent.exists()

    # ... and skip leaves the request out, lists it, and the update index carries it as failed
    monkeypatch.undo()
    plan = Plan(config(datasets={"demo": {"path": str(path), "limit": None, "on_bad_record": "skip"}}))
    run = the_run(plan)
    optimize_memories(spec(run.memories), model, path, 0, out, out.with_suffix(".trace.parquet"), "cpu")
    meta, _ = read_memories(out)
    assert [r["id"] for r in meta["requests"]] == ["ok"]
    assert [(s["id"], s["field"], s["check"]) for s in meta["skipped"]] == [("long", "answer", "model")]
    index = tmp_path / "u" / "shard0.parquet"
    update_weights(spec(run.update), model, out, index, stats=clean[1]["stats"], device="cpu")
    skipped, edited = read_update_index(index)
    assert (skipped["request_ids"], skipped["failed"], skipped["path"]) == (["long"], True, None)
    assert skipped["reason"].startswith(f"skipped: {path}: record 1 (id 'long'): field 'answer'")
    assert edited["request_ids"] == ["ok"] and not edited["failed"]


def test_validate_data_command(work, tmp_path, capsys, tiny_qwen2_path):
    assert cli.main(["validate-data", DEMO, "--format", "jsonl"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line == f"{DEMO}: 24 requests in format jsonl, no problems"

    path = write_jsonl(tmp_path / "edits.jsonl", BAD_FILE)
    assert cli.main(["validate-data", str(path), "--format", "jsonl"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [int(re.search(r"record (\d+)", x)[1]) for x in lines[:-1]] == sorted(BAD_RECORDS)
    assert lines[-1] == f"{path}: 5 problem(s); 4 usable request(s)"

    long = write_jsonl(tmp_path / "long.jsonl", [{"id": "x", "question": "Q?", "answer": "word " * 1100}])
    assert cli.main(["validate-data", str(long), "--format", "jsonl"]) == 0
    assert "no problems" in capsys.readouterr().out
    assert cli.main(["validate-data", str(long), "--format", "jsonl", "--model", str(tiny_qwen2_path)]) == 1
    out = capsys.readouterr().out
    assert "record 0 (id 'x'): field 'answer': question + answer are" in out and "0 usable" in out

    broken = tmp_path / "bench.json"
    broken.write_bytes(b'[{"id": 0, "question": "Q\xe9?", "answer": "x"}]')
    assert cli.main(["validate-data", str(broken), "--format", "unkebench"]) == 1
    assert "bench.json: line 1: not UTF-8" in capsys.readouterr().out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert cli.main(["validate-data", str(empty), "--format", "jsonl"]) == 1
    assert "holds no requests" in capsys.readouterr().out
    assert cli.main(["validate-data", str(tmp_path / "missing.jsonl"), "--format", "jsonl"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err

    # `muke edit` makes the same checks before any model work
    assert (
        cli.main(
            [
                "edit",
                "--model",
                str(tiny_qwen2_path),
                "--method",
                "memit",
                "--requests",
                str(long),
                "--layers",
                "1",
                "2",
            ]
        )
        == 2
    )
    assert "record 0 (id 'x'): field 'answer': question + answer are" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 2. bad config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"colour": "blue"}, r"unknown config key colour"),
        (
            {"datasets": {"demo": {"path": DEMO, "on_bad_recrd": "skip"}}},
            r"unknown config key datasets\.demo\.on_bad_recrd",
        ),
        ({"hparams": {"v_lrr": 0.5}}, r"unknown config key hparams\.v_lrr"),
        (
            {"models": {"tiny": {"preset": "tiny", "trust_remote_code": "yes"}}},
            r"config key models\.tiny\.trust_remote_code: 'yes' is not of type 'boolean'",
        ),
        (
            {"datasets": {"demo": {"path": DEMO, "on_bad_record": "ignore"}}},
            r"config key datasets\.demo\.on_bad_record: 'ignore' is not one of",
        ),
        (
            {"datasets": {"demo": {"path": DEMO, "shard_size": 0}}},
            r"config key datasets\.demo\.shard_size: 0 is less than",
        ),
        ({"generation": {"max_new_tokens": "many"}}, r"config key generation\.max_new_tokens: 'many' is not of type"),
        ({"hparams": {"layers": "1,2"}}, r"config key hparams\.layers: '1,2' is not valid"),
        ({"hparams": {"delta_memory_gib": 0}}, r"config key hparams\.delta_memory_gib: 0 is less than or equal"),
        ({"methods": ["rome"]}, r"config key methods\[0\]: 'rome' is not valid"),
        ({"methods": ["matryoshka+rome"]}, r"config key methods\[0\]: 'matryoshka\+rome' is not valid"),
        (
            {"models": {"tiny": {"preset": "tiny", "tiny": {"arch": "mamba"}}}},
            r"config key models\.tiny\.tiny\.arch: 'mamba' is not one of",
        ),
        ({"models": {"tiny": {"preset": "tinny"}}}, r"config key models\.\*\.preset: no preset 'tinny'"),
    ],
)
def test_bad_config_is_refused_naming_the_key(work, changes, message):
    with pytest.raises(ConfigError, match=message):
        Plan(config(**changes))


def test_unknown_architecture_is_refused_before_the_dag(work, tmp_path):
    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 4}))
    with pytest.raises(
        ConfigError,
        match=r"config key models\.mine\.source \(.*config\.json\): architecture "
        r"'mamba' is not supported; known: \[",
    ):
        Plan(config(models={"mine": {"preset": "tiny", "source": str(folder)}}))


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"hparams": {"layers": [1, 9]}}, "hparams.layers"),
        ({"method_hparams": {"muke-memit": {"layers": [2, 4]}}}, "method_hparams.muke-memit.layers"),
        ({"sweep": {"layers": [[1, 2], [3, 7]]}}, "sweep.layers"),
        (
            {"models": {"tiny": {"preset": "tiny", "hparams": {"unke_layers": [5]}}}, "methods": ["muke-unke"]},
            "models.tiny.hparams.unke_layers",
        ),
    ],
)
def test_layers_out_of_range_are_refused_naming_the_key(work, changes, key):
    with pytest.raises(
        ConfigError,
        match=rf"config key {re.escape(key)}: layer \d is out of range: model tiny has "
        r"4 layers \(0\.\.3\)",
    ):
        Plan(config(**changes))


def test_layers_of_a_local_model_are_checked_against_its_config_json(work, tiny_qwen2_path, tmp_path):
    preset = tmp_path / "mine.yaml"  # a preset that does not say how many layers
    preset.write_text(
        f"source: {tiny_qwen2_path}\nstats: {{corpus: resources/demo_corpus.txt}}\nhparams: {{layers: [3, 4]}}\n"
    )
    with pytest.raises(
        ConfigError,
        match=rf"config key hparams\.layers \(preset {re.escape(str(preset))}\): "
        r"layer 4 is out of range: model mine has 4 layers",
    ):
        Plan(config(models={"mine": {"preset": str(preset)}}))
    preset.write_text(preset.read_text().replace("[3, 4]", "[2, 3]"))
    assert the_run(Plan(config(models={"mine": {"preset": str(preset)}}))).memories.params["memory"]["layer"] == 3


def test_layers_the_plan_could_not_check_are_refused_by_the_first_stage(work, tmp_path):
    from muke.model import ModelError

    root, model = work
    run = the_run(Plan(config()))
    job = spec(run.memories)
    job["params"]["memory"]["layer"] = 7  # as if the preset did not state the layer count
    out = tmp_path / "shard0.safetensors"
    with pytest.raises(
        ModelError,
        match=r"config key hparams\.layers or unke_layers \(the last: the working-memory "
        r"layer\): layer 7 is out of range: the model has layers 0\.\.3",
    ):
        optimize_memories(job, model, DEMO, 0, out, out.with_suffix(".trace.parquet"), "cpu")
    job = spec(run.update)
    job["params"]["options"]["layers"] = [3, 4]
    with pytest.raises(ModelError, match=r"config key hparams\.layers: layer 4 is out of range"):
        update_weights(job, model, out, tmp_path / "index.parquet", device="cpu")


# ---------------------------------------------------------------------------- 3. killed jobs


def start(stage: str, job: dict, *args) -> subprocess.Popen:
    """`python -m muke stage <stage>` on one CPU thread, its log (stderr) collected by a thread."""
    spec_file = Path(f"{stage}-{time.monotonic_ns()}.spec.json")
    spec_file.write_text(json.dumps(job))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "muke",
            "stage",
            stage,
            "--spec",
            f"@{spec_file}",
            "--threads",
            "1",
            "--device",
            "cpu",
            *map(str, args),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    proc.log = []
    threading.Thread(target=lambda: proc.log.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    return proc


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> str:
    """SIGKILL the job as soon as `ready(log text)` holds; returns the log. Fails if the job ends first."""
    deadline = time.monotonic() + timeout
    while not ready("".join(proc.log)):
        assert proc.poll() is None, "the job ended before it could be killed:\n" + "".join(proc.log)
        assert time.monotonic() < deadline, "no progress in the log:\n" + "".join(proc.log)
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler, no cleanup
    assert proc.wait() == -9
    return "".join(proc.log)


def test_killed_optimize_memories_resumes_and_matches_an_uninterrupted_run(work, clean, capfd):
    root, model = work
    plan, reference = clean
    run = the_run(plan)
    out = root / "results/kill-memories/shard0.safetensors"
    trace = out.with_suffix(".trace.parquet")
    job = start(
        "optimize-memories",
        spec(run.memories),
        "--model",
        model,
        "--requests",
        DEMO,
        "--shard",
        0,
        "--out",
        out,
        "--trace",
        trace,
    )
    kill_when(job, lambda log: "request 2/2" in log)
    parts = out.with_name("shard0.parts")
    assert not out.exists() and not trace.exists() and [p.name for p in parts.iterdir()] == ["00000.safetensors"]

    capfd.readouterr()
    optimize_memories(spec(run.memories), model, DEMO, 0, out, trace, "cpu")  # the rerun
    log = capfd.readouterr().err
    assert "request 1/2 demo-00: finished earlier (part file)" in log
    assert re.findall(r"request (\d)/2 \S+: optimising", log) == ["2"]
    assert not parts.exists()
    same_memories(out, reference["memories"])
    same_frames(trace, reference["trace"], drop=())


def test_killed_collect_stats_resumes_and_matches_an_uninterrupted_run(work, monkeypatch):
    import muke.update.stats

    root, model = work
    plan = Plan(config(results="results/kill-stats", stats={"max_docs": None, "batch_tokens": 1024}))
    run = the_run(plan)
    out = root / plan.stats_path(run.model, run.stats)
    partial = out.with_name(out.name + ".partial")
    corpus = plan.stats_corpus(run.stats)
    job = start(
        "collect-stats", spec(run.stats), "--model", model, "--corpus", corpus, "--out", out, "--checkpoint-every", 8
    )
    kill_when(job, lambda log: partial.exists())
    assert not out.exists()
    done, n_docs = read_metadata(partial)["docs_done"], read_metadata(partial)["job"]["n_documents"]
    assert 0 < done < n_docs

    rows, real = [], muke.update.stats.accumulate  # the rerun, counting the documents it reads
    monkeypatch.setattr(
        muke.update.stats,
        "accumulate",
        lambda em, layers, ids, mask, *a: (rows.append(len(ids)), real(em, layers, ids, mask, *a)),
    )
    collect_stats(spec(run.stats), model, corpus, out, device="cpu", checkpoint_every=8)
    assert 0 < sum(rows) <= n_docs - done and not partial.exists()

    monkeypatch.undo()
    ref = root / "results/ref-stats/stats.safetensors"
    collect_stats(spec(run.stats), model, corpus, ref, device="cpu", checkpoint_every=8)
    same_tensors(out, ref)


def test_killed_generate_resumes_and_matches_an_uninterrupted_run(work, capfd):
    root, model = work
    plan = Plan(
        config(
            results="results/kill-generate",
            datasets={"demo": {"path": DEMO, "limit": 3, "shard_size": 3}},
            generation={"max_new_tokens": 16, "batch_size": 1},
        )
    )
    pre = next(r for r in plan.runs if r.method == "pre-edit")
    out = root / plan.generate_path(pre, 0)
    job = start("generate", spec(pre.generate), "--model", model, "--requests", DEMO, "--shard", 0, "--out", out)
    kill_when(job, lambda log: re.search(r"batch 2/\d", log))
    assert not out.exists()

    capfd.readouterr()
    generate(spec(pre.generate), model, DEMO, 0, out, None, "cpu")  # the rerun
    log = capfd.readouterr().err
    assert "finished earlier" in log and not re.search(r"batch 1/\d+: generating", log)

    ref = root / "results/ref-generate/shard0.parquet"
    generate(spec(pre.generate), model, DEMO, 0, ref, None, "cpu")
    same_frames(out, ref)


# ---------------------------------------------------------------------------- 4. non-finite numbers


def test_nan_in_delta_optimisation_fails_that_request_and_the_rest_goes_on(work, clean, monkeypatch):
    from muke.engine.forward import CachedShiftedLM  # the fast path: the default config

    root, model = work
    plan, reference = clean
    run = the_run(plan)
    first = load_requests_checked(DEMO, "jsonl")[0][0]
    real = CachedShiftedLM.logprobs

    def poisoned(self, *args, **kwargs):  # NaN log-probs for the first request only
        lp = real(self, *args, **kwargs)
        return lp * float("nan") if first.question in self.seq.prompt else lp

    monkeypatch.setattr(CachedShiftedLM, "logprobs", poisoned)
    out = root / "results/nan-memories/shard0.safetensors"
    optimize_memories(spec(run.memories), model, DEMO, 0, out, out.with_suffix(".trace.parquet"), "cpu")
    meta, tensors = read_memories(out)
    bad, good = meta["requests"]
    assert bad["failed"] and re.match(r"window 0, step 0: (loss|affinity_gradient) is not finite", bad["error"])
    assert not good["failed"] and not any(k.startswith("0.") for k in tensors)
    assert torch.equal(tensors["1.z"], read_memories(reference["memories"])[1]["1.z"])

    index = root / "results/nan-update/shard0.parquet"
    update_weights(spec(run.update), model, out, index, stats=reference["stats"], device="cpu")
    rows = read_update_index(index)
    assert [(r["request_ids"], r["failed"], r["path"] is None) for r in rows] == [
        (["demo-00"], True, True),
        (["demo-01"], False, False),
    ]
    assert rows[0]["reason"] == bad["error"] and rows[1]["reason"] is None


def test_nan_statistics_raise_a_numerical_error_naming_the_layer(work, clean, tmp_path):
    from muke.update.edit import compute_update

    root, model = work
    plan, reference = clean
    run = the_run(plan)
    tensors, meta = load_file(reference["stats"]), read_metadata(reference["stats"])
    tensors["layer1.mom2"][0, 0] = float("nan")
    forged = tmp_path / "nan.safetensors"
    save_file(tensors, forged, metadata={"muke": json.dumps(meta)})
    em = load(model_path(model))
    targets, _ = shard_targets(reference["memories"])
    options = dict(run.update.params["options"])
    layers, keys = options.pop("layers"), options.pop("keys")
    before = em.down_proj(1).weight.clone()
    with pytest.raises(NumericalError, match=r"layer 1, computed update: V is not finite"):
        compute_update(em, targets[:1], "memit", layers, keys, stats=load_stats(forged, em, layers), **options)
    assert torch.equal(em.down_proj(1).weight, before)  # the model is left as it was


def test_nan_in_unke_block_fitting_raises_a_numerical_error_naming_the_layer(work, clean, monkeypatch):
    import muke.update.unke
    from muke.update.edit import compute_update

    root, model = work
    em = load(model_path(model))
    targets, _ = shard_targets(clean[1]["memories"])
    real = muke.update.unke._mse
    monkeypatch.setattr(muke.update.unke, "_mse", lambda *a, **kw: real(*a, **kw) * float("nan"))
    before = {n: p.clone() for n, p in em.model.named_parameters()}
    with pytest.raises(NumericalError, match=r"layer 1, computed update: model\.layers\.1\.\S+ is not finite"):
        compute_update(em, targets[:1], "unke", [1, 2], "sequence", steps=2, n_preserve=2)
    assert all(torch.equal(p, before[n]) for n, p in em.model.named_parameters())


def test_update_weights_records_a_non_finite_batch_and_goes_on(work, clean, monkeypatch):
    import muke.update.memit

    root, model = work
    plan, reference = clean
    run = the_run(plan)
    calls, real = [], muke.update.memit.memit_solve

    def nan_once(*args, **kwargs):  # the first batch's first layer only
        calls.append(1)
        out = real(*args, **kwargs)
        return out * float("nan") if len(calls) == 1 else out

    monkeypatch.setattr(muke.update.memit, "memit_solve", nan_once)
    index = root / "results/nan-batch/shard0.parquet"
    update_weights(spec(run.update), model, reference["memories"], index, stats=reference["stats"], device="cpu")
    first, second = read_update_index(index)
    assert (first["request_ids"], first["failed"], first["path"], first["batch"]) == (["demo-00"], True, None, 0)
    assert first["reason"] == "layer 1, computed update: V is not finite"
    assert not second["failed"] and second["reason"] is None
    clean_second = read_update_index(reference["update"])[1]
    same_tensors(second["path"], clean_second["path"])
    assert set(pd.read_parquet(index).columns) >= {"batch", "file", "request_ids", "failed", "seconds", "reason"}


# ---------------------------------------------------------------------------- 5. determinism


def test_same_config_and_seed_give_identical_results(work, clean):
    from muke.update.weights import WeightUpdate

    root, model = work
    _, a = clean
    b = run_chain(Plan(config(results="results/again")), model)
    same_memories(a["memories"], b["memories"])
    same_frames(a["trace"], b["trace"], drop=())
    same_tensors(a["stats"], b["stats"])
    for ra, rb in zip(read_update_index(a["update"]), read_update_index(b["update"]), strict=True):
        da, db = WeightUpdate.load(ra["path"]), WeightUpdate.load(rb["path"])
        assert da.request_ids == db.request_ids and da.factors.keys() == db.factors.keys()
        assert all(torch.equal(x, y) for layer in da.factors for x, y in zip(da.factors[layer], db.factors[layer]))
    same_frames(a["generate"], b["generate"])
    same_frames(a["samples"], b["samples"])
    same_frames(a["summary"], b["summary"])


# ---------------------------------------------------------------------------- 6. safety


def test_auto_delta_batches_carry_their_memory_budget_in_the_identity(work):
    """delta_batch_size auto: the budget that sizes the δ batches is a parameter of the memories job (4 GiB
    unless set); a fixed batch size leaves it out, so those jobs keep their identity."""

    def memories(**hparams):
        return the_run(Plan(config(hparams=hparams))).memories

    auto, smaller = memories(delta_batch_size="auto"), memories(delta_batch_size="auto", delta_memory_gib=0.5)
    assert auto.params["delta_memory_gib"] == 4.0 and smaller.params["delta_memory_gib"] == 0.5
    assert auto.identity != smaller.identity
    fixed, fixed_budget = memories(), memories(delta_memory_gib=0.5)
    assert "delta_memory_gib" not in fixed.params and fixed.identity == fixed_budget.identity


def test_no_pickle_loading_in_the_package():
    sources = [*(REPO / "muke").rglob("*.py"), *(REPO / "workflow").rglob("*.smk"), REPO / "Snakefile"]
    for path in sources:
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(", text):
            args = text[call.end() : text.index(")", call.end())]
            assert "weights_only=True" in args, f"{path}: torch.load without weights_only=True"
        assert not re.search(r"^\s*import pickle|^\s*from pickle", text, re.M), f"{path} imports pickle"
        assert "trust_remote_code=True" not in text, f"{path} turns remote code on by itself"


def test_remote_code_runs_only_when_the_config_turns_it_on(work, tiny_qwen2_path, tmp_path, monkeypatch):
    marker = tmp_path / "remote-code-ran"
    folder = tmp_path / "custom"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_qwen2_path / name).read_bytes())
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "configuration_evil.EvilConfig",
                },
            }
        )
    )
    (folder / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    model_dir = tmp_path / "prepared"
    write_json(model_dir / MODEL_REF, {"path": str(folder)})  # no trust_remote_code: off
    with pytest.raises(Exception):  # noqa: B017 - the error type of refused remote code differs across transformers versions
        load_model(model_dir, "float32", "cpu")
    assert not marker.exists()

    # the plan passes the setting to the prepared folder, and load_model to transformers
    seen = []
    monkeypatch.setattr("muke.model.load", lambda path, **kw: seen.append(kw["trust_remote_code"]))
    for entry, trusted in (({}, False), ({"trust_remote_code": True}, True)):
        model = Plan(config(models={"mine": {"preset": "tiny", "source": str(tiny_qwen2_path), **entry}})).models[
            "mine"
        ]
        assert model.spec.params["trust_remote_code"] is trusted
        out = prepare_model(spec(model.spec), tmp_path / f"m{trusted}")
        assert json.loads((out / MODEL_REF).read_text())["trust_remote_code"] is trusted
        load_model(out, "float32", "cpu")
    assert seen == [False, True]


def test_statistics_of_another_model_layer_corpus_or_tokenizer_are_refused(work, clean, tiny_llama_path, tmp_path):
    root, model = work
    plan, reference = clean
    run = the_run(plan)
    em = load(model_path(model))
    stats = reference["stats"]
    with pytest.raises(StatsError, match=r"statistics are for another model \(.*'n_layers': 4.*this model is"):
        load_stats(stats, load(tiny_llama_path), [1, 2])
    with pytest.raises(StatsError, match=r"statistics cover layers \[1, 2\], not the requested layers \[0\]"):
        load_stats(stats, em, [0, 1])
    meta = read_metadata(stats)
    forged = tmp_path / "tokenizer.safetensors"
    save_file(load_file(stats), forged, metadata={"muke": json.dumps({**meta, "tokenizer_vocab_sha256": "0" * 64})})
    with pytest.raises(StatsError, match="collected with another tokenizer"):
        load_stats(forged, em, [1, 2])

    corpus = tmp_path / "other.txt"  # the same job on another corpus
    corpus.write_text("Velmora is a port city.\n\nThe Copper Bridge has seven arches.\n")
    other = Plan(config(results="results/other-corpus", stats={"corpus": str(corpus)}))
    other_run = the_run(other)
    other_stats = root / other.stats_path(other_run.model, other_run.stats)
    collect_stats(spec(other_run.stats), model, str(corpus), other_stats, device="cpu")
    with pytest.raises(
        StatsError,
        match=r"statistics were collected by another statistics job .*corpus "
        rf"'{re.escape(str(corpus))}'",
    ):
        update_weights(
            spec(run.update),
            model,
            reference["memories"],
            root / "results/x/shard0.parquet",
            stats=other_stats,
            device="cpu",
        )


def test_chat_statistics_enter_the_stats_identity_only_when_on(work):
    def stats_specs(**stats):
        return [spec for _, spec in Plan(config(stats=stats))._stats.values()]

    plain, off, on = stats_specs(), stats_specs(chat=False), stats_specs(chat=True)
    assert plain and all("chat" not in s.params for s in plain + off)
    assert [s.identity for s in off] == [s.identity for s in plain]  # existing statistics keep their identity
    assert all(s.params["chat"] is True for s in on) and {s.identity for s in on}.isdisjoint(s.identity for s in plain)


# ---------------------------------------------------------------------------- 7. shared store, checksums


def stats_job(name: str, **stats):
    """(the stats spec, its corpus) of a plan on results/`name`."""
    plan = Plan(config(results=f"results/{name}", stats=stats))
    run = the_run(plan)
    return spec(run.stats), plan.stats_corpus(run.stats), Path(plan.stats_path(run.model, run.stats))


def test_two_jobs_sharing_a_store_collect_its_statistics_once(work):
    """Two experiments (two folders, one store) started together: one computes, the other waits for it and
    links its file; both outputs are that file, checksummed."""
    root, model = work
    job, corpus, path = stats_job("store-a")
    store = root / "shared-store"
    outs = [root / f"results/store-{x}" / path.name for x in "ab"]
    procs = [
        start("collect-stats", job, "--model", model, "--corpus", corpus, "--out", o, "--store", store) for o in outs
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, "".join(proc.log)
        proc.log_text = "".join(proc.log)
    assert sorted("found in the store" in p.log_text for p in procs) == [False, True]
    assert sum("loading" in p.log_text for p in procs) == 1  # one model load: one computation
    entry = next(store.glob("stats-*.safetensors"))
    assert all(os.path.samefile(o, entry) for o in outs)
    digest = recorded_sha256(entry)
    assert digest == sha256(entry) == recorded_sha256(outs[0]) == recorded_sha256(outs[1])
    assert json.loads(outs[0].with_name(outs[0].stem + ".manifest.json").read_text())["sha256"] == digest
    assert not list(store.glob("*.partial")) and not list(store.glob("*.owner"))


def test_killed_store_collection_resumes_and_matches_an_uninterrupted_run(work, capfd):
    """kill -9 while the store's entry is being collected: its lock dies with the job, the rerun resumes
    from the store's checkpoint and ends with the sums of a run never interrupted."""
    root, model = work
    job, corpus, path = stats_job("kill-store", max_docs=None, batch_tokens=1024)
    store, out = root / "kill-store", root / "results/kill-store" / path.name
    proc = start(
        "collect-stats",
        job,
        "--model",
        model,
        "--corpus",
        corpus,
        "--out",
        out,
        "--store",
        store,
        "--checkpoint-every",
        8,
    )
    kill_when(proc, lambda log: any(store.glob("*.partial")))
    assert not out.exists() and not list(store.glob("stats-*.safetensors"))
    capfd.readouterr()
    collect_stats(job, model, corpus, out, device="cpu", checkpoint_every=8, store=store)
    assert "waiting" not in capfd.readouterr().err  # the killed job's lock went with it
    ref = root / "results/kill-store-ref" / path.name
    collect_stats(job, model, corpus, ref, device="cpu", checkpoint_every=8)
    same_tensors(out, ref)


def test_a_corrupted_store_entry_is_collected_again(work, capfd):
    root, model = work
    job, corpus, path = stats_job("corrupt-store")
    store, out = root / "corrupt-store", root / "results/corrupt-store" / path.name
    collect_stats(job, model, corpus, out, device="cpu", store=store)
    entry = next(store.glob("stats-*.safetensors"))
    data = entry.read_bytes()
    out.unlink()
    entry.write_bytes(data[: len(data) // 2])  # a truncated file, as a full disk leaves it
    capfd.readouterr()
    collect_stats(job, model, corpus, out, device="cpu", store=store)
    assert "truncated or corrupted" in capfd.readouterr().err
    same_tensors(out, entry)
    assert entry.read_bytes() == data or recorded_sha256(entry) == sha256(entry)


def flip(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def copy_with_checksum(src: Path, dst: Path) -> Path:
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    if checksum_path(src).is_file():
        shutil.copy(checksum_path(src), checksum_path(dst))
    return dst


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_artifacts_are_refused_naming_the_file(work, clean, tmp_path, damage):
    """Memories, statistics, a ΔW file and the index that lists it: each is refused once damaged."""
    import shutil

    root, model = work
    _, reference = clean
    hurt = (lambda p: p.write_bytes(p.read_bytes()[:-9])) if damage == "truncate" else flip

    memories = copy_with_checksum(reference["memories"], tmp_path / "memories" / "shard0.safetensors")
    read_memories(memories)
    hurt(memories)
    with pytest.raises(ChecksumError, match=re.escape(str(memories))):
        read_memories(memories)

    stats = copy_with_checksum(reference["stats"], tmp_path / "stats.safetensors")
    hurt(stats)
    with pytest.raises(ChecksumError, match=re.escape(str(stats))):
        load_stats(stats, load(model_path(model)), [1, 2])

    index = copy_with_checksum(reference["update"], tmp_path / "update" / "shard0.parquet")
    shutil.copytree(reference["update"].with_suffix(""), index.with_suffix(""))
    delta = read_update_index(index)[0]["path"]
    hurt(delta)
    with pytest.raises(ChecksumError, match=re.escape(str(delta))):
        read_update_index(index)
    hurt(index)
    with pytest.raises(ChecksumError, match=re.escape(str(index))):
        read_update_index(index)


def test_a_damaged_chain_file_is_refused(tmp_path):
    """read_chain verifies the chain's index and each ΔW file it lists (sha256 column)."""
    from muke.workflow.stages.common import read_chain

    chain = tmp_path / "chain.parquet"
    (tmp_path / "chain").mkdir()
    for t in range(2):
        (tmp_path / "chain" / f"{t:04d}.safetensors").write_bytes(b"delta %d" % t)
    rows = [
        {"batch": t, "file": f"{t:04d}.safetensors", "request_ids": json.dumps([f"r{t}"]), "n_edits": t + 1}
        | {
            "failed": False,
            "seconds": 0.0,
            "reason": None,
            "sha256": sha256(tmp_path / "chain" / f"{t:04d}.safetensors"),
        }
        for t in range(2)
    ]
    pd.DataFrame(rows).to_parquet(chain, index=False)
    record_sha256(chain)
    assert [p.name for p in read_chain(chain, 2)[0]] == ["0000.safetensors", "0001.safetensors"]
    flip(tmp_path / "chain" / "0001.safetensors", at=0)
    assert len(read_chain(chain, 1)[0]) == 1  # the first edit only: the damaged file is not read
    with pytest.raises(ChecksumError, match="0001.safetensors"):
        read_chain(chain, 2)


FULL_DISK = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from muke.workflow.stages.collect_stats import collect_stats
collect_stats(json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], device="cpu", store=sys.argv[6])
"""


def test_a_write_that_fails_midway_leaves_nothing_a_rerun_would_trust(work, clean):
    """The store's statistics file cannot be written whole (RLIMIT_FSIZE: "File too large", as a full disk
    or a quota says it): the job fails naming the file and its folder, the store holds no entry, no
    checksum and no temporary file, and the rerun collects the statistics of an uninterrupted run."""
    root, model = work
    _, reference = clean
    job, corpus, path = stats_job("full-disk")
    store, out = root / "full-disk-store", root / "results/full-disk" / path.name
    limit = reference["stats"].stat().st_size // 2
    args = [str(limit), json.dumps(job), str(model), corpus, str(out), str(store)]
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(rf"WriteError: writing {re.escape(str(store))}/stats-\S+ failed \(.*File too large", proc.stderr)
    assert f"permissions of {store}" in proc.stderr
    assert sorted(p.name for p in store.iterdir()) == [next(store.glob("*.lock")).name]  # the lock file only
    assert not out.exists()
    collect_stats(job, model, corpus, out, device="cpu", store=store)
    same_tensors(out, reference["stats"])
