"""The 7B path rehearsed on a CPU with real 7B-sized matrices (`make rehearsal`; not a test, not in CI).

    python benchmarks/rehearsal.py build --out results/rehearsal-model       # random model, Qwen2.5-7B widths
    snakemake --profile workflow/profiles/default --configfile config/experiments/rehearsal-qwen2.5-7b.yaml
    python benchmarks/rehearsal.py compare --configfile config/experiments/rehearsal-qwen2.5-7b.yaml
    python benchmarks/rehearsal.py peak --configfile config/experiments/rehearsal-qwen2.5-7b.yaml \
        --rule update_weights --method muke-unke                            # one job again, its true peak

`build` writes a randomly initialised qwen2 model with Qwen2.5-7B-Instruct's exact widths (hidden 3584,
d_ff 18944, 28 / 4 heads, vocab 152064) but only 3 decoder layers, in bf16, with muke's tiny tokenizer (its
ids are a subset of the vocabulary). `compare` prints, per job of the finished run, the peak resident memory
Snakemake's benchmark file measured beside muke.workflow.estimate's CPU figure for that stage, and their
ratio estimate / measured (the estimate's claim: within 25 %), from the join the workflow report's
table uses (muke.eval.environment.memory_table). Needs ~16 GB of free memory.

Snakemake samples a job's resident set every 0.5 s for its first 15 s, then every 30 s
(snakemake.benchmark), so a longer job's measured peak is its largest sample, which can miss a phase
shorter than that. `peak` reruns one job of the finished run alone, as its rule would (the stage
command on the rehearsal's own inputs, outputs in a temporary folder), and prints its true peak (the
child's ru_maxrss from wait4), the largest of its resident sets sampled every 0.1 s, what Snakemake's
schedule would have sampled of that run, and muke estimate's figure.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN = "Qwen/Qwen2.5-7B-Instruct"
SPEC_OF = {
    "collect_stats": "stats",
    "optimize_memories": "memories",
    "update_weights": "update",
    "generate": "generate",
}


def widths() -> dict:
    """Qwen2.5-7B-Instruct's config.json values as muke estimate knows them, less the layer count."""
    from muke.workflow.widths import KNOWN_WIDTHS

    known = {k: v for k, v in KNOWN_WIDTHS[QWEN].items() if k not in ("model_type", "num_hidden_layers")}
    return {**known, "rms_norm_eps": 1e-6, "rope_theta": 1e6}


def build(out: Path, layers: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from muke.data import DEMO_CORPUS
    from muke.tiny import train_tokenizer

    tok = train_tokenizer(DEMO_CORPUS)
    config = Qwen2Config(
        **widths(), num_hidden_layers=layers, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, bf16")


def compare(configfile: str) -> None:
    from muke.eval.environment import memory_table, read_benchmarks
    from muke.workflow.config import ROOT, load_yaml
    from muke.workflow.job_costs import job_memory
    from muke.workflow.plan import Plan

    plan = Plan(load_yaml(configfile), basedir=ROOT)
    estimates = job_memory(plan)
    bench = read_benchmarks(Path(plan.results) / "benchmarks", {e["identity"] for e in estimates})
    rows = memory_table(bench, estimates).dropna(subset=["measured GiB", "estimate GiB"])
    print(f"{'job':<70} {'measured GiB':>12} {'estimate GiB':>12} {'ratio':>6}")
    for (rule, job), row in rows.iterrows():
        measured, estimate = row["measured GiB"], row["estimate GiB"]
        print(f"{rule + '/' + job:<70} {measured:>12.2f} {estimate:>12.2f} {estimate / measured:>6.2f}")


def job_command(plan, run, rule: str, out: Path) -> list[str]:
    """The stage command the rule of `run` runs (workflow/rules/*.smk), on the finished run's inputs,
    its outputs under `out`, on the CPU with one thread."""
    base = [sys.executable, "-m", "muke", "stage", rule.replace("_", "-")]
    spec = getattr(run, SPEC_OF[rule])
    args = ["--spec", spec.to_json(), "--model", plan.model_dir(run.model)]
    if rule == "collect_stats":
        args += ["--corpus", plan.stats_corpus(spec), "--out", f"{out}/stats.safetensors"]
    elif rule == "optimize_memories":
        args += ["--requests", str(run.dataset.path), "--shard", "0", "--out", f"{out}/shard0.safetensors"]
        args += ["--trace", f"{out}/shard0.trace.parquet"]
    elif rule == "update_weights":
        args += ["--memories", plan.memories_path(run, 0), "--cache-dir", f"{out}/nullspace"]
        if run.stats is not None:
            args += ["--stats", plan.stats_path(run.model, run.stats)]
        if run.update.params["backend"] == "unke":
            args += ["--preservation", str(plan.preservation_path(run))]
        args += ["--out", f"{out}/updates/shard0.parquet"]
    elif rule == "generate":
        args += ["--requests", str(run.dataset.path), "--shard", "0", "--out", f"{out}/generate/shard0.parquet"]
        if run.update is not None:
            args += ["--update", plan.update_path(run, 0)]
    return base + args + ["--device", "cpu", "--threads", "1"]


def rss_of_tree(pid: int) -> int:
    """Resident bytes of a process and its children (as Snakemake's benchmark sums them)."""
    import psutil

    total = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def snakemake_samples(timeline: list[tuple[float, int]]) -> int:
    """The largest of the resident sets Snakemake's schedule would have read from this timeline."""
    from snakemake.benchmark import BENCHMARK_INTERVAL, BENCHMARK_INTERVAL_SHORT

    times = [i * BENCHMARK_INTERVAL_SHORT for i in range(BENCHMARK_INTERVAL + 1)]
    end = timeline[-1][0]
    while times[-1] + BENCHMARK_INTERVAL <= end:
        times.append(times[-1] + BENCHMARK_INTERVAL)
    return max((max((r for t, r in timeline if t <= s), default=0) for s in times), default=0)


def peak(configfile: str, rule: str, method: str, tmp: str | None) -> None:
    from muke.workflow.config import ROOT, load_yaml
    from muke.workflow.footprint import GiB
    from muke.workflow.job_costs import job_memory
    from muke.workflow.plan import Plan

    plan = Plan(load_yaml(configfile), basedir=ROOT)
    run = next((r for r in plan.runs if r.method == method), None)
    if run is None:
        raise SystemExit(f"no run of method {method!r} in {configfile}")
    with tempfile.TemporaryDirectory(dir=tmp) as out:
        cmd = job_command(plan, run, rule, Path(out))
        print("$", shlex.join(cmd[:5]), "...", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start, timeline = time.monotonic(), []
        with open(Path(out) / "job.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                timeline.append((time.monotonic() - start, rss_of_tree(proc.pid)))
                time.sleep(0.1)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"the job failed:\n{(Path(out) / 'job.log').read_text()[-3000:]}")
    spec = getattr(run, SPEC_OF[rule])
    estimate = next(e["cpu_bytes"] for e in job_memory(plan) if (e["rule"], e["identity"]) == (rule, spec.identity))
    true = usage.ru_maxrss * 1024
    print(
        f"{rule}/{run.model.name}/{method} ({spec.identity}): {timeline[-1][0]:.0f} s; true peak {true / GiB:.2f} GiB, "
        f"sampled every 0.1 s {max(r for _, r in timeline) / GiB:.2f}, on Snakemake's schedule "
        f"{snakemake_samples(timeline) / GiB:.2f}; estimate {estimate / GiB:.2f} (ratio {estimate / true:.2f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layers", type=int, default=3)
    p = sub.add_parser("compare")
    p.add_argument("--configfile", required=True)
    p = sub.add_parser("peak", help="rerun one job of the finished run alone and print its true peak")
    p.add_argument("--configfile", required=True)
    p.add_argument("--rule", required=True, choices=list(SPEC_OF))
    p.add_argument("--method", required=True, help="the run's method (its memories, update or answers)")
    p.add_argument("--tmp", default=None, help="folder for the job's outputs (a temporary folder inside it)")
    args = ap.parse_args()
    if args.command == "build":
        build(args.out, args.layers)
    elif args.command == "compare":
        compare(args.configfile)
    else:
        peak(args.configfile, args.rule, args.method, args.tmp)


if __name__ == "__main__":
    main()
