"""What a reviewer needs to reproduce the report's numbers: git commit, package versions and hardware,
seeds, stage identities, input checksums, Snakemake benchmarks (with `muke estimate`'s peak memory of each
job beside the measured one) and the resolved configuration."""

from __future__ import annotations

import json
import platform
import re
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath

import pandas as pd

from muke.eval.page import esc, fmt, note, table
from muke.host import torch_info
from muke.io import sha256

PACKAGES = ["muke", "torch", "transformers", "snakemake", "lm_eval", "numpy", "pandas", "matplotlib"]
GiB, MiB = 1024**3, 1024**2


def git_info() -> dict:
    """Commit and dirty flag of the git checkout holding muke's source, else 'unknown'."""
    src = Path(__file__).resolve().parents[1]  # the muke package

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(src), *args], capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if not (top / "muke").is_dir() or not (top / "muke").samefile(src):
            raise RuntimeError("muke is not the checkout's own package")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return {"commit": "unknown", "dirty": "unknown"}


def _size(path: Path) -> int:
    """Bytes of a file, or of a folder's files."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def checksums(inputs) -> pd.DataFrame:
    rows = [
        {
            "path": str(p),
            "bytes": _size(Path(p)) if Path(p).exists() else 0,
            "sha256": sha256(p) if Path(p).exists() else "missing",
        }
        for p in inputs
    ]
    return pd.DataFrame(rows, columns=["path", "bytes", "sha256"])


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def seeds(config, prefix: str = "") -> dict:
    """Every config key naming a seed or a determinism setting, with its dotted path."""
    out = {}
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, (dict, list)):
            out.update(seeds(value, path + "."))
        elif "seed" in str(key).lower() or "determin" in str(key).lower():
            out[path] = value
    return out


def read_benchmarks(root: str | Path | None, identities=None) -> pd.DataFrame:
    """Snakemake benchmark files under `root`: one row per repeat, `rule` from the path. With
    `identities`, only the files whose path names one of them (the jobs of the current plan: the
    folder also keeps the benchmarks of earlier settings)."""
    if root is None or not Path(root).is_dir():
        return pd.DataFrame()
    frames = []
    for path in sorted(p for p in Path(root).rglob("*") if p.suffix in (".tsv", ".txt") and p.is_file()):
        rel = path.relative_to(root)
        if identities is not None and not any(i in str(rel) for i in identities):
            continue
        df = pd.read_csv(path, sep="\t")
        if "s" not in df:
            continue
        frames.append(df.assign(rule=rel.parts[0] if len(rel.parts) > 1 else path.stem, job=str(rel)))
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    for col in ("s", "max_rss"):
        df[col] = pd.to_numeric(df.get(col), errors="coerce")
    return df


def benchmark_summary(bench: pd.DataFrame) -> pd.DataFrame:
    """Per rule: jobs, total and longest wall time, peak resident memory."""
    g = bench.groupby("rule", sort=True)
    out = pd.DataFrame(
        {
            "jobs": g["job"].nunique(),
            "wall s (total)": g["s"].sum(),
            "wall s (longest job)": g["s"].max(),
            "peak max_rss (MB)": g["max_rss"].max(),
        }
    )
    return out.map(fmt).assign(jobs=g["job"].nunique())


def _job(path: str) -> str:
    """A benchmark file's job below its rule's folder, shards together: generate/tiny/demo/m-1a2b/shard0.tsv
    -> tiny/demo/m-1a2b."""
    parts = PurePosixPath(path).with_suffix("").parts
    parts = parts[:-1] if len(parts) > 1 and re.fullmatch(r"shard\d+", parts[-1]) else parts
    return "/".join(parts[1:] or parts)


def _measured(bench: pd.DataFrame) -> pd.DataFrame:
    """Per rule and job (`_job`): the largest max_rss in bytes."""
    if not len(bench):
        return pd.DataFrame(columns=["rule", "job", "measured"])
    jobs = bench.assign(job=bench["job"].map(_job), measured=bench["max_rss"] * MiB)
    return jobs.groupby(["rule", "job"], as_index=False)["measured"].max()


def memory_table(bench: pd.DataFrame, estimates, gpu_stages=()) -> pd.DataFrame:
    """Per job: the measured peak memory (`read_benchmarks`), muke estimate's and their ratio, in GiB;
    NaN where a side is missing. `estimates`: {rule, identity, host_bytes, device_bytes, cpu_bytes} per
    job (muke.workflow.job_costs.job_memory), matched to the job whose path names its identity; the
    host peak of a GPU job where its rule is in `gpu_stages`, with its device peak, else a CPU job's."""
    est = pd.DataFrame(list(estimates), columns=["rule", "identity", "host_bytes", "device_bytes", "cpu_bytes"])
    measured = _measured(bench)
    found = [
        next((i for i in est.loc[est["rule"] == rule, "identity"] if i in job), None)
        for rule, job in zip(measured["rule"], measured["job"])
    ]
    measured["identity"] = pd.Series(found, index=measured.index, dtype=object)
    t = measured.merge(est, on=["rule", "identity"], how="outer")
    gpu = t["rule"].isin(list(gpu_stages))
    estimate = t["host_bytes"].where(gpu, t["cpu_bytes"])
    out = pd.DataFrame(
        {
            "rule": t["rule"],
            "job": t["job"].fillna(t["identity"]),
            "measured GiB": t["measured"] / GiB,
            "estimate GiB": estimate / GiB,
            "estimate device GiB": t["device_bytes"].where(gpu) / GiB,
            "measured / estimate": t["measured"] / estimate,
        }
    )
    return out.sort_values(["rule", "job"]).set_index(["rule", "job"])


def gpu_stages(config: dict | None, jobs: pd.DataFrame | None) -> set[str]:
    """The stages whose jobs ran with a GPU: their manifests saw CUDA and runtime.device is not cpu."""
    if jobs is None or "cuda available" not in jobs or (config or {}).get("runtime", {}).get("device") == "cpu":
        return set()
    return set(jobs.loc[jobs["cuda available"] == "True", "stage"])


def _memory_section(bench: pd.DataFrame, estimates, gpu: set[str]) -> tuple[list[str], pd.DataFrame]:
    t = memory_table(bench, estimates, gpu)
    return [
        "<h3>Peak memory per job: measured vs <code>muke estimate</code></h3>",
        "<p class='caption'>Measured: the largest peak resident set size (<code>max_rss</code>, which Snakemake "
        "writes in MiB) of the job's benchmark files, its shards together. Snakemake samples it every 30 s after "
        "the job's first 15 s, so a peak that lasts less than that (UnKE's per-block fit) can be missed and a "
        "ratio below 1 need not mean the estimate is high (docs/REHEARSAL.md). Estimate: <code>muke estimate</code>'s "
        "peak for one job (muke/workflow/footprint.py: the tensors the job holds at its peak plus the Python "
        "runtime, from the model's widths and the run's sizes; it claims ±25 % on the CPU, checked there for "
        "collect_stats and a MEMIT update by tests/test_estimate.py). On the CPU alone that is the job's whole "
        "memory; where the stage's manifests saw a GPU, the job's host side, its device memory beside it. —: no "
        "benchmark file, or no estimate (prepare_model, score, trace_layers and edit_sequence have none).</p>",
        table(t.map(fmt)) if len(t) else note("No benchmark files and no estimates."),
    ], t


def _dict_table(d: dict, key: str, value: str) -> pd.DataFrame:
    text = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in d.items()}
    return pd.DataFrame({key: list(text), value: list(text.values())})


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _hardware(jobs: pd.DataFrame | None) -> tuple[list[str], pd.DataFrame]:
    """Where the jobs ran, from their manifests; without any, the report process's own facts, said so."""
    if jobs is None or not len(jobs):
        own = _dict_table(torch_info(), "fact", "value")
        return [
            note("No job manifest names its host: the facts below are the report process's, not the GPU jobs'."),
            table(own, text=True),
        ], own
    determinism = "; ".join(dict.fromkeys(jobs["determinism"])) if "determinism" in jobs else ""
    shown = jobs.drop(columns="determinism", errors="ignore")
    return [
        "<p class='caption'>From each job's manifest.json, written on the machine the job ran on (a stage's "
        "shards share one folder and manifest: the last shard to finish writes it); <code>jobs</code>: job "
        "folders reporting those facts.</p>",
        f"<p>{esc(determinism)}</p>",
        table(shown, text=True),
    ], shown


def reproducibility(
    config, stage_identities, inputs, bench, jobs=None, settings=None, memory_estimates=()
) -> tuple[list[str], dict]:
    """The reproducibility section and its tables (for CSV). jobs: muke.eval.tables.job_hosts (the
    hardware facts of the jobs' own machines); settings: muke.eval.tables.run_settings (every δ-loop
    option and the decoding of each run); memory_estimates: muke estimate's peaks of each job
    (`memory_table`)."""
    g = git_info()
    if not isinstance(stage_identities, pd.DataFrame):
        stage_identities = _dict_table(stage_identities or {}, "stage", "identity")
    hardware_parts, hardware = _hardware(jobs)
    tables = {
        "stage_identities": stage_identities,
        "input_checksums": checksums(inputs or []),
        "versions": _dict_table(package_versions(), "package", "version"),
        "hardware": hardware,
    }
    seed_text = ", ".join(f"{k} = {v}" for k, v in seeds(config or {}).items()) or "none set in the config"
    parts = [
        "<h2 id='repro'>Reproducibility</h2>",
        f"<p>git commit <code>{esc(g['commit'])}</code>, working tree dirty: <b>{esc(g['dirty'])}</b></p>",
        f"<p>Seeds / determinism keys: {esc(seed_text)}</p>",
        "<h3>Hardware: where each stage ran</h3>",
        *hardware_parts,
        "<h3>Package versions (report process; each job's manifest records its own)</h3>",
        table(tables["versions"], text=True),
    ]
    if settings is not None and len(settings):
        tables["run_settings"] = settings
        parts += [
            "<h3>Settings of each run</h3>",
            "<p class='caption'>Every option of the δ loop each run's target memories were optimised with "
            "(lambda_order: <code>paper</code> as Eq. 12 reads, <code>reference</code> reversed as the authors' "
            "code) and how its answers were decoded (greedy, or the paper protocol with the model's own "
            "generation settings as the generate job recorded them).</p>",
            table(settings, text=True),
        ]
    parts += [
        "<h3>Stage parameter identities</h3>",
        "<p class='caption'>Each job's identity hashes its own parameters, its inputs' identities and the "
        "muke code it runs; the job's output folder carries it, and its manifest.json lists the "
        "parameters.</p>",
        table(tables["stage_identities"], text=True),
        "<h3>Input data checksums (sha256)</h3>",
        table(tables["input_checksums"], text=True),
        "<h3>Wall time and peak memory per stage (Snakemake benchmarks)</h3>",
    ]
    if len(bench):
        tables["benchmarks"] = bench
        parts.append(table(benchmark_summary(bench)))
    else:
        parts.append(note("No Snakemake benchmark files found."))
    memory_parts, tables["peak_memory"] = _memory_section(bench, memory_estimates, gpu_stages(config, jobs))
    parts += [*memory_parts, "<h3>Resolved configuration</h3>", f"<pre>{esc(_yaml(config or {}))}</pre>"]
    return parts, tables
