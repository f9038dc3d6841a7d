"""The workflow through a real SLURM cluster (snakemake-executor-plugin-slurm, workflow/profiles/slurm).

A single-node cluster is started on this machine by .ci/slurm-setup.sh (root only; SLURM must be
installed: `.ci/slurm-setup.sh install`, or set MUKE_SLURM_INSTALL=1 to let this test install it with
apt-get) and stopped afterwards. The tiny workflow runs once locally and once through SLURM; the jobs
must go through sbatch, GPU jobs must ask for --gpus, and the tables must be equal.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import time

import pandas as pd
import pytest
import yaml
from test_workflow import REPO, SNAKEMAKE, TINY, env, make_workdir, snakemake, snapshot

SETUP = REPO / ".ci" / "slurm-setup.sh"

pytestmark = [
    pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed (extra 'workflow')"),
    pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="starting a SLURM cluster needs root"),
]

# Two shards of one request, one method; the unedited model's locality only. δ optimisation and
# generation ask for a GPU (the cluster's fake ones) to check that --gpus reaches sbatch.
CONFIG = copy.deepcopy(TINY)
CONFIG.update(results="results/slurm-test", methods=["muke-memit"])
CONFIG["datasets"] = {"demo": {"path": "resources/demo_edits.jsonl", "limit": 2, "shard_size": 1}}
CONFIG["locality"] = {**TINY["locality"], "edits": 0}
CONFIG["models"] = {"tiny": {"preset": "tiny", "resources": {"optimize_memories": {"gpu": 1}, "generate": {"gpu": 1}}}}
GPU_RULES = {"optimize_memories", "generate"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    if shutil.which("slurmctld") is None:
        if os.environ.get("MUKE_SLURM_INSTALL") != "1":
            pytest.skip("SLURM is not installed: run .ci/slurm-setup.sh install (or set MUKE_SLURM_INSTALL=1)")
        install = subprocess.run([str(SETUP), "install"], capture_output=True, text=True)
        if install.returncode == 3:
            pytest.skip(f"cannot install SLURM here: {install.stderr.strip()[-300:]}")
        assert install.returncode == 0, install.stderr[-3000:]
    start = subprocess.run([str(SETUP), "start", str(state)], capture_output=True, text=True, timeout=300)
    if start.returncode == 3:
        pytest.skip(f"no test cluster: {start.stderr.strip()[-300:]}")
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        yield state
    finally:
        subprocess.run([str(SETUP), "stop", str(state)], capture_output=True, text=True, timeout=120)


def test_tiny_workflow_through_slurm(cluster, tmp_path):
    repo = snapshot(tmp_path / "repo")
    local = make_workdir(tmp_path / "local", repo)
    began = time.perf_counter()
    snakemake(local, CONFIG, repo=repo)
    local_seconds = time.perf_counter() - began

    remote = make_workdir(tmp_path / "slurm", repo)
    (remote / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    cmd = [
        str(SNAKEMAKE),
        "-s",
        str(repo / "Snakefile"),
        "-d",
        str(remote),
        "--configfile",
        str(remote / "config.yaml"),
        "--profile",
        str(repo / "workflow" / "profiles" / "slurm"),
        # this cluster: no accounting database (squeue for status), one partition, fast polling
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--slurm-no-account",
        "--default-resources",
        "slurm_partition=debug",
        "mem_mb=1000",
        "runtime=30",
        "--latency-wait",
        "5",
        "--jobs",
        "4",
        "--verbose",
    ]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env(repo, slurm=True))
    slurm_seconds = time.perf_counter() - began
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-10000:]
    print(f"\nlocal {local_seconds:.0f} s, SLURM {slurm_seconds:.0f} s")

    # every rule but the local `report` went through sbatch, with SLURM job ids
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", out)
    calls = re.findall(r"sbatch call: (.*)", out)
    rules = [re.search(r"--comment '?rule_(\w+?)(?:_wildcards_|'|\s)", c).group(1) for c in calls]
    # prepare 1, stats 1, memories 2, update 2, generate 2 + 2 (pre-edit), score 1 + 1, locality 1
    assert len(submitted) == len(calls) == 13, (submitted, rules)
    assert set(rules) == {
        "prepare_model",
        "collect_stats",
        "optimize_memories",
        "update_weights",
        "generate",
        "score",
        "locality",
    }
    assert all(job.isdigit() for job in submitted)
    logs = {p.stem for p in (remote / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(submitted) <= logs, (submitted, logs)  # one SLURM log per job id (kept by the profile)

    # GPU rules ask for --gpus; the others do not
    for rule, call in zip(rules, calls):
        assert ("--gpus=1" in call) == (rule in GPU_RULES), (rule, call)
        assert "-p debug" in call or "-p 'debug'" in call

    # the same numbers as the local run
    for table in ("edit_metrics", "locality"):
        a = pd.read_parquet(local / CONFIG["results"] / "tables" / f"{table}.parquet")
        b = pd.read_parquet(remote / CONFIG["results"] / "tables" / f"{table}.parquet")
        pd.testing.assert_frame_equal(a, b)
