"""The 7B path rehearsed on a CPU with real 7B-sized matrices (`make rehearsal`; not a test, not in CI).

    python benchmarks/rehearsal.py build --out results/rehearsal-model       # random model, Qwen2.5-7B widths
    snakemake --profile workflow/profiles/default --configfile config/experiments/rehearsal-qwen2.5-7b.yaml
    python benchmarks/rehearsal.py compare --configfile config/experiments/rehearsal-qwen2.5-7b.yaml

`build` writes a randomly initialised qwen2 model with Qwen2.5-7B-Instruct's exact widths (hidden 3584,
d_ff 18944, 28 / 4 heads, vocab 152064) but only 3 decoder layers, in bf16, with muke's tiny tokenizer (its
ids are a subset of the vocabulary). `compare` prints, per job of the finished run, the peak resident memory
Snakemake's benchmark file measured beside muke.workflow.estimate's CPU figure for that stage, and their
ratio estimate / measured (the estimate's claim: within 25 %), from the join the workflow report's
table uses (muke.eval.environment.memory_table). Needs ~16 GB of free memory.
"""

import argparse
from pathlib import Path

QWEN = "Qwen/Qwen2.5-7B-Instruct"


def widths() -> dict:
    """Qwen2.5-7B-Instruct's config.json values as muke estimate knows them, less the layer count."""
    from muke.workflow.estimate import KNOWN_WIDTHS

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
    from muke.workflow.estimate import job_memory
    from muke.workflow.plan import Plan

    plan = Plan(load_yaml(configfile), basedir=ROOT)
    estimates = job_memory(plan)
    bench = read_benchmarks(Path(plan.results) / "benchmarks", {e["identity"] for e in estimates})
    rows = memory_table(bench, estimates).dropna(subset=["measured GiB", "estimate GiB"])
    print(f"{'job':<70} {'measured GiB':>12} {'estimate GiB':>12} {'ratio':>6}")
    for (rule, job), row in rows.iterrows():
        measured, estimate = row["measured GiB"], row["estimate GiB"]
        print(f"{rule + '/' + job:<70} {measured:>12.2f} {estimate:>12.2f} {estimate / measured:>6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layers", type=int, default=3)
    p = sub.add_parser("compare")
    p.add_argument("--configfile", required=True)
    args = ap.parse_args()
    build(args.out, args.layers) if args.command == "build" else compare(args.configfile)


if __name__ == "__main__":
    main()
