"""The Snakemake workflow: config checking, one real tiny run, and which rules a change reruns.

The caching tests ask Snakemake itself (a dry run after the real run of config/tiny.yaml) which jobs
it would run; the expectations are the design's: a stage reruns when its own parameters, its inputs'
identities or its code change, together with everything below it, and nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from muke.workflow.config import ConfigError, check_config, check_preset, load_yaml
from muke.workflow.identity import STAGES, code_identity, module_closure
from muke.workflow.plan import Plan

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())

needs_snakemake = pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed (extra 'workflow')")


# ---------------------------------------------------------------------------- helpers

NO_SLURM = Path(__file__).resolve().parent / "no_slurm"


def env(extra_path: Path | None = None, slurm: bool = False) -> dict:
    """The environment of a snakemake run: the venv's tools first; offline hub.

    Without `slurm`, a `scontrol` that fails at once comes first on PATH: snakemake-executor-plugin-slurm
    asks `scontrol show config` at every start-up, which waits 10 s where SLURM's client is installed
    but no controller answers (a CI machine prepared for tests/test_slurm.py).
    """
    path = [str(SNAKEMAKE.parent), os.environ.get("PATH", "")]
    if not slurm:
        path.insert(0, str(NO_SLURM))
    e = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=os.pathsep.join(path),
    )
    if extra_path is not None and extra_path != REPO:
        e["PYTHONPATH"] = f"{extra_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return e


def make_workdir(path: Path, repo: Path = REPO) -> Path:
    """A working directory like a user's: the repository's resources/ beside the results."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "resources").exists():
        (path / "resources").symlink_to(repo / "resources")
    return path


def snapshot(dest: Path) -> Path:
    """A copy of the workflow and the muke package: a run sees one version of the code even while
    the repository is being edited (code identities would move under it)."""
    shutil.copytree(
        REPO,
        dest,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "results",
            ".snakemake",
            "__pycache__",
            "*.egg-info",
            ".pytest_cache",
            "tests",
            "benchmarks",
        ),
    )
    return dest


def snakemake(workdir: Path, config: dict, *args, repo: Path = REPO, check=True, timeout=900):
    """Run snakemake on `config` (written to workdir/config.yaml) with the default profile; the
    `muke` imported by the Snakefile and the jobs is `repo`'s."""
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cmd = [
        str(SNAKEMAKE),
        "-s",
        str(repo / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(cfg),
        "--profile",
        str(repo / "workflow" / "profiles" / "default"),
        "--cores",
        "2",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(repo))
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def planned(workdir: Path, config: dict, repo: Path = REPO) -> Counter:
    """{rule: jobs} that a dry run schedules (rule `all` left out)."""
    proc = snakemake(workdir, config, "-n", repo=repo)
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return Counter()
    table = out.split("Job stats:", 1)[1]
    jobs = Counter()
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) not in ("all", "total"):
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def changed(**paths) -> dict:
    """The tiny config with values replaced: changed(hparams={"v_lr": 1.0})."""
    config = copy.deepcopy(TINY)
    for key, value in paths.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


# ---------------------------------------------------------------------------- (a) config checking


def test_schema_refuses_unknown_keys_naming_them():
    config = changed(generation={"max_new_toks": 8})
    with pytest.raises(ConfigError, match=r"unknown config key generation\.max_new_toks \(allowed: .*max_new_tokens"):
        check_config(config)
    config = changed(hparams={"v_lrr": 0.5})
    with pytest.raises(ConfigError, match=r"unknown config key hparams\.v_lrr"):
        check_config(config)
    config = changed(models={"tiny": {"preset": "tiny", "hparms": {}}})
    with pytest.raises(ConfigError, match=r"unknown config key models\.tiny\.hparms"):
        check_config(config)
    with pytest.raises(ConfigError, match=r"unknown config key colour"):
        check_config({**TINY, "colour": "blue"})


def test_schema_refuses_wrong_types_and_values_naming_the_key():
    with pytest.raises(ConfigError, match=r"config key generation\.max_new_tokens: 'many' is not of type 'integer'"):
        check_config(changed(generation={"max_new_tokens": "many"}))
    with pytest.raises(ConfigError, match=r"config key datasets\.demo\.format: 'csv' is not one of"):
        check_config(changed(datasets={"demo": {"path": "x.jsonl", "format": "csv"}}))
    with pytest.raises(ConfigError, match=r"config key methods\[0\]: 'rome' is not valid"):
        check_config(changed(methods=["rome"]))
    with pytest.raises(ConfigError, match=r"config key hparams\.v_lr: 'fast' is not valid"):
        check_config(changed(hparams={"v_lr": "fast"}))
    with pytest.raises(ConfigError, match=r"'models' is a required property"):
        check_config({"datasets": TINY["datasets"], "methods": ["memit"]})


def test_schema_fills_defaults():
    config = check_config(copy.deepcopy(TINY))
    assert config["pre_edit"] is True and config["score"]["families"] == ["paper", "standard"]
    assert config["generation"]["max_new_tokens"] == 8 and config["generation"]["batch_size"] == 8
    assert config["datasets"]["demo"]["format"] == "jsonl"


def test_plan_checks_presets_sweeps_and_files(tmp_path, monkeypatch):
    monkeypatch.chdir(make_workdir(tmp_path))
    with pytest.raises(ConfigError, match=r"no preset 'tinny'"):
        Plan(changed(models={"tiny": {"preset": "tinny"}}))
    with pytest.raises(ConfigError, match=r"config key sweep\.v_lr: value 'x' is not valid"):
        Plan(changed(sweep={"v_lr": [0.5, "x"]}))
    with pytest.raises(ConfigError, match=r"config key datasets\.demo\.path: file 'missing\.jsonl' not found"):
        Plan(changed(datasets={"demo": {"path": "missing.jsonl"}}))
    bad = tmp_path / "bad-preset.yaml"
    bad.write_text("source: tiny\nstats: {corpus: resources/demo_corpus.txt}\nhparams: {windw: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown config key hparams\.windw"):
        Plan(changed(models={"tiny": {"preset": str(bad)}}))


def test_schema_knows_every_hyperparameter_of_resolve_method():
    from muke.update.backends import BACKENDS
    from muke.update.methods import DEFAULT_PRESET, MEMORY_OPTIONS

    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    known = set(schema["$defs"]["hparams"]["properties"])
    wanted = set(DEFAULT_PRESET) | set(MEMORY_OPTIONS) | {k for b in BACKENDS.values() for k in b.options}
    assert wanted - {"null_space_cache"} <= known  # the projector cache is a runtime folder, not a setting


def test_presets_and_experiment_configs_are_valid(tmp_path, monkeypatch):
    for preset in (REPO / "config" / "models").glob("*.yaml"):
        check_preset(load_yaml(preset), preset)
    for path in [REPO / "config" / "config.yaml", *(REPO / "config" / "experiments").glob("*.yaml")]:
        check_config(yaml.safe_load(path.read_text()))


def test_plan_identities_follow_the_stage_graph(tmp_path, monkeypatch):
    """In-process version of the caching rule: which stage identities a change moves."""
    monkeypatch.chdir(make_workdir(tmp_path))

    def ids(config):
        plan = Plan(config)
        out = {}
        for run in plan.runs:
            for stage in ("stats", "memories", "update", "generate", "score", "locality"):
                spec = getattr(run, stage)
                if spec is not None:
                    out[(run.method, stage)] = spec.identity
        return out

    base = ids(copy.deepcopy(TINY))

    def moved(config):
        new = ids(config)
        return {stage for (method, stage), i in new.items() if method == "muke-memit" and base[(method, stage)] != i}

    assert moved(changed(hparams={"v_lr": 1.0})) == {"memories", "update", "generate", "score", "locality"}
    assert moved(changed(hparams={"mom2_update_weight": 200})) == {"update", "generate", "score", "locality"}
    assert moved(changed(generation={"max_new_tokens": 5})) == {"generate", "score"}
    assert moved(changed(stats={"max_docs": 32})) == {"stats", "update", "generate", "score", "locality"}
    assert moved(changed(locality={"limit": 2})) == {"locality"}
    assert moved(changed(score={"families": ["paper"]})) == {"score"}
    assert ids(changed(hparams={"v_lr": 0.5})) == base  # the preset's value, written out
    assert moved(changed(hparams={"key_position": "question"})) == {
        "memories",
        "update",
        "generate",
        "score",
        "locality",
    }
    assert ids(changed(hparams={"key_position": "template"})) == base  # the paper's placement keeps old identities
    placed = Plan(changed(sweep={"key_position": ["template", "question"]}))
    runs = [r for r in placed.runs if r.method == "muke-memit"]
    assert sorted(r.setting.get("key_position") for r in runs) == ["question", "template"]
    assert len({r.memories.identity for r in runs}) == 2
    sweep = Plan(changed(sweep={"v_lr": [0.5, 1.0]}))
    assert sorted(r.setting.get("v_lr") for r in sweep.runs if r.method == "muke-memit") == [0.5, 1.0]
    listed = Plan(changed(hparams={"v_lr": [0.5, 1.0]}))
    assert {r.memories.identity for r in listed.runs if r.memories} == {
        r.memories.identity for r in sweep.runs if r.memories
    }


@needs_snakemake
def test_methods_with_one_objective_share_their_memories(tmp_path, monkeypatch):
    """μKE keys with the MEMIT or the AlphaEdit backend optimise the same target memories: one path, one job
    per shard, and each run's update reads it."""
    monkeypatch.chdir(make_workdir(tmp_path))
    config = changed(methods=["muke-memit", "matryoshka+alphaedit"])
    plan = Plan(config)
    memit, alpha = (next(r for r in plan.runs if r.method == m) for m in config["methods"])
    assert memit.memories.identity == alpha.memories.identity
    assert plan.memories_path(memit, 0) == plan.memories_path(alpha, 0)
    assert f"/matryoshka-{memit.memories.identity}/" in plan.memories_path(memit, 0)
    assert memit.update.identity != alpha.update.identity
    jobs = planned(tmp_path, config)
    assert jobs["optimize_memories"] == jobs["update_weights"] // 2 > 0


def test_retention_prompts_follow_the_runs_chat_settings(tmp_path, monkeypatch):
    """The unrelated questions are asked as the run asks its edit requests: its system_prompt reaches every
    locality job's retention settings, the pre-edit one's too."""
    monkeypatch.chdir(make_workdir(tmp_path))
    retention = {**TINY["locality"]["retention"], "enabled": True}
    plan = Plan(changed(hparams={"system_prompt": "Be brief."}, locality={"retention": retention}))
    specs = [r.locality for r in plan.runs if r.locality] + list(plan.pre_edit_locality.values())
    assert len(specs) >= 3
    assert {s.params["retention"]["system_prompt"] for s in specs} == {"Be brief."}
    assert Plan(changed(locality={"retention": retention})).pre_edit_locality != plan.pre_edit_locality


def copied_package(tmp_path) -> Path:
    """A copy of the muke package to edit (code identities of the copy, not of the repository)."""
    package = tmp_path / "muke"
    shutil.copytree(REPO / "muke", package, ignore=shutil.ignore_patterns("__pycache__"))
    return package


def edit(path: Path, new: str, old: str | None = None) -> None:
    """Append `new` to the file (or replace `old` by it); a later mtime, so no cache keeps the old tree."""
    text = path.read_text()
    path.write_text(text + new if old is None else text.replace(old, new, 1))
    time.sleep(0.01)


def identities(package: Path, stages=STAGES) -> dict:
    return {stage: code_identity(stage, package) for stage in stages}


def test_code_identity_ignores_comments_but_not_code(tmp_path):
    package = copied_package(tmp_path)
    before = identities(package, ("score", "generate", "optimize_memories"))
    metrics = package / "eval" / "metrics.py"
    edit(metrics, '"""Scores (reworded)', '"""Scores')
    edit(metrics, "\n# a comment\n")
    assert identities(package, before) == before
    edit(metrics, "\nEXTRA = 1\n")
    after = identities(package, before)
    assert after["score"] != before["score"]
    assert after["generate"] == before["generate"] and after["optimize_memories"] == before["optimize_memories"]


def test_code_identity_follows_indirect_imports(tmp_path):
    """A helper added to a module that a stage reaches only through another module (the δ stage:
    stages.optimize_memories → engine.memory → engine.objectives) moves that stage's identity, not an
    unrelated one's; a comment or docstring there moves nothing."""
    package = copied_package(tmp_path)
    assert "muke.engine.objectives" in module_closure("muke.workflow.stages.optimize_memories", package)
    stage_source = (package / "workflow" / "stages" / "optimize_memories.py").read_text()
    assert "objectives" not in stage_source  # reached indirectly only
    before = identities(package)
    objectives = package / "engine" / "objectives.py"
    edit(objectives, "\n# a note\n")
    edit(objectives, '"""Reworded. ', '"""')  # the module docstring
    assert identities(package) == before
    edit(objectives, "\n\ndef _new_helper(x):\n    return 2 * x\n")
    after = identities(package)
    assert after["optimize_memories"] != before["optimize_memories"]
    assert after["score"] == before["score"] and after["prepare_model"] == before["prepare_model"]


def test_code_identity_covers_a_new_module_a_stage_imports(tmp_path):
    """A module created for a stage (imported inside a function, relatively or not) is covered from
    the first import on, and so is what it imports in turn."""
    package = copied_package(tmp_path)
    before = identities(package)
    (package / "eval" / "rescale.py").write_text('"""New."""\nfrom .page import fmt\n\nFACTOR = 1.0\n')
    assert identities(package) == before  # not imported yet
    score = package / "workflow" / "stages" / "score.py"
    edit(
        score, "    from muke.eval import rescale  # noqa: F401\n    import pandas as pd\n", "    import pandas as pd\n"
    )
    covered = module_closure("muke.workflow.stages.score", package)
    assert {"muke.eval.rescale", "muke.eval.page"} <= covered.keys()  # and rescale's relative import
    middle = code_identity("score", package)
    assert middle != before["score"]
    edit(package / "eval" / "rescale.py", "FACTOR = 2.0\n", "FACTOR = 1.0\n")
    second = code_identity("score", package)
    assert second not in (middle, before["score"])
    edit(package / "eval" / "page.py", "\nNEW = 1\n")
    after = identities(package)
    assert after["score"] != second and after["generate"] == before["generate"]


# ---------------------------------------------------------------------------- (b, c) the real tiny run


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return snapshot(tmp_path_factory.mktemp("snapshot") / "repo")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, repo):
    """config/tiny.yaml run end to end once (a few minutes on 2 cores)."""
    if not SNAKEMAKE.exists():
        pytest.skip("snakemake is not installed (extra 'workflow')")
    workdir = make_workdir(tmp_path_factory.mktemp("workflow"), repo)
    start = time.perf_counter()
    snakemake(workdir, TINY, repo=repo)
    print(f"\ntiny workflow: {time.perf_counter() - start:.0f} s")
    return workdir


@needs_snakemake
def test_tiny_run_produces_the_tables(tiny_run):
    results = tiny_run / TINY["results"]
    metrics = pd.read_parquet(results / "tables" / "edit_metrics.parquet")
    assert set(metrics["method"]) == {"pre-edit", "muke-memit", "anyedit-memit"}
    assert set(metrics["kind"]) == {"question", "para_question", "sub_questions"}
    assert set(metrics["family"]) == {"paper", "standard"}
    assert len(metrics) == 3 * 3 * 2 and (metrics["n"] == 2).all()
    assert metrics[["bleu", "rouge_l", "bertscore"]].notna().all().all()
    fluency = ["ngram_entropy", "repetition", "target_ngram_entropy", "target_repetition"]  # muke.eval.fluency
    assert metrics[fluency].notna().all().all() and metrics[["repetition", "target_repetition"]].le(1).all().all()
    locality = pd.read_parquet(results / "tables" / "locality.parquet")
    assert set(locality["model_state"]) == {"pre-edit", "edited"}
    assert set(locality["task"]) == {"muke_mmlu_demo", "muke_ifeval_demo", "retention", "text_shift"}
    assert set(locality.loc[locality.model_state == "edited", "method"]) == {"muke-memit", "anyedit-memit"}
    lm_eval = locality[locality["task"].str.startswith("muke_")]
    assert (locality["n_models"] == 1).all() and (lm_eval["n_samples"] == 3).all()  # locality.edits 1, limit 3
    # retention on the first 4 unrelated prompts, one of each kind (config/tiny.yaml)
    retention = set(locality.loc[locality["task"] == "retention", "metric"])
    assert {"first_token_agreement", "prefix_exact_match", "first_token_agreement (code)"} <= retention
    (manifest,) = (results / "memories" / "tiny" / "demo").glob("matryoshka-*/manifest.json")
    assert '"v_lr": 0.5' in manifest.read_text()
    generations = pd.concat(map(pd.read_parquet, (results / "generate").rglob("shard*.parquet")))
    assert {"id", "kind", "prompt", "output", "target", "tokens", "seconds"} <= set(generations.columns)
    samples = pd.concat(map(pd.read_parquet, (results / "score").rglob("samples.parquet")))
    assert (samples["target_tokens"] > 0).all() and samples[fluency].notna().all().all()
    assert not list(results.rglob(".*.tmp")) and not list(results.rglob("*.parts"))


@needs_snakemake
def test_tiny_run_writes_the_full_report(tiny_run):
    """The page: both tables, the paper's Fig. 5 and the δ traces as images, failures, and the
    reproducibility record of this plan (stage identities, data checksums, benchmarks of its jobs, their
    peak memory beside muke estimate's)."""
    report = tiny_run / TINY["results"] / "report"
    html = (report / "index.html").read_text()
    assert "paper family" in html and "standard family" in html and "muke-memit" in html
    assert "Locality (Table 2)" in html and "muke_ifeval_demo" in html
    integrity = html[html.index("id='integrity'") : html.index("id='case-study'")]
    assert ">paraphrase BLEU<" in integrity and ">repetition (target)<" in integrity
    assert ">first-token agreement<" in integrity and ">prefix exact match<" in integrity
    cases = html[html.index("id='case-study'") : html.index("id='locality'")]  # unrelated prompts (edits: 1)
    assert "<table class='text unrelated'>" in cases and "<i>question</i>: Which planet is known as the red" in cases
    assert cases.count("<table class='text unrelated'>") == 1 and "not measured for this request" in cases
    assert "<img alt='BLEU vs target length (paper Fig. 5)'" in html and "<img alt='δ-loss traces'" in html
    assert "Failed requests: <b>0</b>" in html
    repro = html[html.index("id='repro'") :]
    assert "git commit" in repro and "muke_cmd: python -m muke stage" in repro
    spec = json.loads((report / "spec.json").read_text())
    for run in spec["runs"]:
        assert all(identity in repro for identity in run["identities"].values())
    demo = tiny_run / "resources" / "demo_edits.jsonl"
    assert hashlib.sha256(demo.read_bytes()).hexdigest() in repro
    assert re.search(r"<th>optimize_memories</th>\s*<td>2</td>", repro)  # benchmarks: 2 jobs of this plan
    assert (report / "stage_identities.csv").is_file() and (report / "benchmarks.csv").is_file()
    assert "Peak memory per job: measured vs <code>muke estimate</code>" in repro
    estimated = {"collect_stats", "optimize_memories", "update_weights", "generate", "locality"}
    assert {e["rule"] for e in spec["memory_estimates"]} == estimated
    memory = pd.read_csv(report / "peak_memory.csv").dropna(subset=["measured GiB", "estimate GiB"])
    assert set(memory["rule"]) == estimated and (memory["measured / estimate"] > 0).all()


@needs_snakemake
def test_snakemake_report_bundles_the_page_and_tables(tiny_run, repo):
    snakemake(tiny_run, TINY, "--report", "report.zip", repo=repo)
    with zipfile.ZipFile(tiny_run / "report.zip") as bundle:
        names = bundle.namelist()
        assert "muke tiny workflow (CI)" in bundle.read("report/report.html").decode()
    assert {"index.html", "edit_metrics.csv", "locality.csv"} <= {Path(name).name for name in names}


@needs_snakemake
def test_nothing_reruns_after_a_run(tiny_run, repo):
    assert planned(tiny_run, TINY, repo) == Counter()


BELOW_DELTAS = dict(update_weights=2, generate=2, score=2, locality=2, report=1)


@needs_snakemake
@pytest.mark.parametrize(
    "change, reruns",
    [
        (dict(generation={"max_new_tokens": 6}), dict(generate=3, score=3, report=1)),
        (dict(hparams={"v_lr": 1.0}), dict(optimize_memories=2, **BELOW_DELTAS)),
        (dict(hparams={"mom2_update_weight": 200}), BELOW_DELTAS),
        (dict(stats={"max_docs": 32}), dict(collect_stats=1, **BELOW_DELTAS)),
        # how jobs run, not what they compute (run_setting() params): only the report, which records the config
        (dict(muke_cmd="muke stage", runtime={"device": "cuda:1", "stats_checkpoint_every": 7}), dict(report=1)),
    ],
    ids=[
        "generation-reruns-generate-score-report",
        "v_lr-reruns-memories-and-below-not-stats",
        "mom2-reruns-update-and-below-not-memories",
        "stats-reruns-stats-and-updates",
        "runtime-settings-rerun-only-the-report",
    ],
)
def test_a_change_reruns_only_the_stages_it_reaches(tiny_run, repo, change, reruns):
    assert planned(tiny_run, changed(**change), repo) == Counter(reruns)


@needs_snakemake
def test_sweep_runs_only_the_new_values_in_one_dag(tiny_run, repo):
    expected = Counter(optimize_memories=2, update_weights=2, generate=2, score=2, locality=2, report=1)
    assert planned(tiny_run, changed(sweep={"v_lr": [0.5, 1.0]}), repo) == expected
    assert planned(tiny_run, changed(hparams={"v_lr": [0.5, 1.0]}), repo) == expected


@needs_snakemake
def test_code_change_reruns_the_stages_that_run_it(tiny_run, repo, tmp_path):
    edited = tmp_path / "repo"
    shutil.copytree(repo, edited)
    metrics = edited / "muke" / "eval" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n# a comment changes nothing\n")
    assert planned(tiny_run, TINY, repo=edited) == Counter()
    metrics.write_text(metrics.read_text() + "\nEXTRA = 1\n")
    # scores and locality (answer retention scores with the same BLEU) run metrics.py
    assert planned(tiny_run, TINY, repo=edited) == Counter(score=3, locality=3, report=1)


@needs_snakemake
def test_settings_never_overwrite_and_setting_back_reuses(tiny_run, repo):
    """Run one method with another mom2_update_weight; then both settings' files exist, the old setting
    needs only the report again, and a sweep over both values is already complete."""
    other = changed(method_hparams={"muke-memit": {"mom2_update_weight": 200}})
    assert planned(tiny_run, other, repo) == Counter(update_weights=1, generate=1, score=1, locality=1, report=1)
    snakemake(tiny_run, other, repo=repo)
    updates = tiny_run / TINY["results"] / "updates" / "tiny" / "demo"
    assert len(list(updates.glob("muke-memit-*/shard0.parquet"))) == 2
    assert planned(tiny_run, TINY, repo) == Counter(report=1)
    both = changed(method_hparams={"muke-memit": {"mom2_update_weight": [100, 200]}})
    assert planned(tiny_run, both, repo) == Counter(report=1)
    snakemake(tiny_run, both, repo=repo)
    metrics = pd.read_parquet(tiny_run / TINY["results"] / "tables" / "edit_metrics.parquet")
    settings = set(metrics.loc[metrics.method == "muke-memit", "setting"])
    assert settings == {'{"mom2_update_weight": 100}', '{"mom2_update_weight": 200}'}
    html = (tiny_run / TINY["results"] / "report" / "index.html").read_text()
    assert "<img alt='Metrics vs mom2_update_weight (paper Fig. 6)'" in html


@needs_snakemake
def test_snakemake_reports_config_errors_by_key(tmp_path):
    proc = snakemake(make_workdir(tmp_path), changed(generation={"max_new_toks": 8}), "-n", check=False)
    assert proc.returncode != 0
    assert "unknown config key generation.max_new_toks" in proc.stdout + proc.stderr


@pytest.mark.slow  # two Snakemake runs of prepare_model + collect_stats: ~1 min
@needs_snakemake
def test_a_second_experiment_reuses_the_stored_statistics(tmp_path, repo):
    """runtime.stats_store: experiment B (another results folder) links experiment A's statistics from
    the store instead of collecting them again."""
    workdir = make_workdir(tmp_path / "work", repo)
    store = tmp_path / "store"

    def experiment(results: str) -> Path:
        config = changed(results=results, runtime={"stats_store": str(store)})
        snakemake(workdir, config, "--until", "collect_stats", repo=repo)
        (out,) = (workdir / results / "stats").rglob("*.safetensors")
        return out

    first = experiment("results/a")
    (stored,) = store.glob("*.safetensors")  # beside it: its .sha256 and its .lock
    second = experiment("results/b")
    assert first.read_bytes() == second.read_bytes()
    assert first.stat().st_ino == second.stat().st_ino == stored.stat().st_ino  # one file, linked twice
    (log,) = (workdir / "results" / "b" / "logs" / "collect_stats").rglob("*.log")
    assert "found in the store" in log.read_text() and "loading" not in log.read_text()


@pytest.mark.slow  # one method's prepare → stats → memories → update → generate: ~1 min
@needs_snakemake
def test_without_keep_updates_the_weight_files_go_once_answered(tmp_path, repo):
    """runtime.keep_updates false: update_weights' ΔW folder is temp(), deleted after the generate job that
    read it; the index the report reads stays."""
    workdir = make_workdir(tmp_path / "work", repo)
    config = changed(methods=["muke-memit"], runtime={"keep_updates": False}, pre_edit=False)
    snakemake(workdir, config, "--until", "generate", repo=repo)
    results = workdir / config["results"]
    (index,) = (results / "updates").rglob("shard0.parquet")
    assert list((results / "generate").rglob("shard0.parquet")) and not index.with_suffix("").exists()
    assert pd.read_parquet(index)["file"].notna().all()  # the update was made, then removed
