"""A memory and cost plan before anything runs (`muke estimate --configfile FILE`): per stage, its jobs,
the peak device (GPU) and host memory of one job and the GPU-hours of all of them, from the model's
widths (muke.workflow.widths) and the run's sizes: each job's peaks and work by muke.workflow.footprint,
for every job of the plan and per stage by muke.workflow.job_costs. `muke estimate` plans with answers
of `--answer-tokens` (UnKEBench's are a few hundred).

Time is a roofline: max(FLOPs / flops_per_s, bytes moved / bytes_per_s) per job, summed over a stage's
jobs; the rates are options (defaults: an H100-class card at a sustained fraction of its peak, bf16 /
fp16 matmuls four times as fast as fp32 ones). It is a planning figure, good to a factor of about two;
the memory figures are checked against measured peaks (tests/test_estimate.py on CPU, `make rehearsal`
at Qwen2.5-7B's widths: docs/REHEARSAL.md), and `job_costs.job_memory` gives each job's for the workflow
report, which sets them beside the peaks Snakemake measured.
"""

from __future__ import annotations

from muke.workflow.footprint import GiB


def cmd_estimate(args) -> None:
    # the plan and the costs read the backends (torch): imported when the command runs, not with the parser
    from muke.workflow.config import ROOT, load_yaml
    from muke.workflow.job_costs import estimate_plan, format_table
    from muke.workflow.plan import Plan

    plan = Plan(load_yaml(args.configfile), basedir=ROOT)
    rows = estimate_plan(
        plan, args.answer_tokens, args.doc_tokens, args.tflops * 1e12, args.bandwidth * 1e12, args.tflops_fp32 * 1e12
    )
    print(f"{args.configfile}: {len(plan.runs)} runs; memory per job, GPU-hours of all jobs")
    print(format_table(rows, args.gpu_gib * GiB))


def add_estimate_parser(sub) -> None:
    p = sub.add_parser("estimate", help="per stage: jobs, peak GPU / host memory per job, GPU-hours (no model run)")
    p.add_argument("--configfile", required=True, help="the workflow config (as snakemake --configfile)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="card memory to check each job against")
    p.add_argument("--answer-tokens", type=int, default=300, help="tokens of a target answer")
    p.add_argument("--doc-tokens", type=int, default=700, help="tokens of a statistics document before truncation")
    p.add_argument("--tflops", type=float, default=200.0, help="sustained bf16 / fp16 TFLOP/s of one GPU")
    p.add_argument("--tflops-fp32", type=float, default=50.0, help="sustained fp32 TFLOP/s of one GPU")
    p.add_argument("--bandwidth", type=float, default=2.0, help="sustained device memory TB/s of one GPU")
    p.set_defaults(func=cmd_estimate)
