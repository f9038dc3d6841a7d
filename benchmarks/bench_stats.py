"""One-pass vs per-layer second-moment statistics (not a test; CI does not time it).

    python benchmarks/bench_stats.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct --layers 4 5 6 7 8

Per-layer: one collection per layer, each forward pass stopping after that layer (ROME/MEMIT's
layer_stats with stop=True). One pass: a single collection hooking every layer, stopping after the
last. Three arms on the same documents, --repeats times each in rotating order (mean seconds):
one pass packed (muke's default), per layer packed (like for like: the gain of the single pass alone),
per layer padded (the authors' layer_stats: one document per row). Prints seconds, the largest relative
difference of the sums, and a last line `speedup: X.XX` (per layer padded / one pass packed).

Bound: for layers 4..8 the per-layer arm runs 5+6+7+8+9 = 35 layer passes per token, the single pass 9,
and both accumulate Σ k kᵀ once per layer (d_ff² / 2 multiply-adds per token, ~1/3 of a SmolLM2 layer):
like for like ≤ ~3.4×; the rest of the gain against layer_stats is packing (no padded positions).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from muke.model import load
from muke.update.stats import StatsConfig, collect_stats, load_stats


def timed(em, cfg, out):
    start = time.perf_counter()
    stats = load_stats(collect_stats(em, cfg, out, progress=False), em, cfg.layers)
    return time.perf_counter() - start, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", default="resources/demo_corpus.txt")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 5, 6, 7, 8])
    ap.add_argument("--max-docs", type=int, default=150)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each arm, in ABBA order; times are averaged")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    em = load(args.model)
    base = dict(corpus=args.corpus, max_docs=args.max_docs, batch_tokens=args.batch_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def one_pass():
            return timed(em, StatsConfig(layers=tuple(args.layers), **base), tmp / "joint.safetensors")

        def per_layer(pack):
            runs = [
                timed(em, StatsConfig(layers=(l,), pack=pack, **base), tmp / f"layer{l}.safetensors")
                for l in args.layers
            ]
            return sum(s for s, _ in runs), {l: stats for l, (_, stats) in zip(args.layers, runs)}

        # rotating order over the repeats, so that a load drifting on a shared machine hits every arm alike
        arms = {
            "one pass": one_pass,
            "per layer": lambda: per_layer(True),
            "per layer padded": lambda: per_layer(False),
        }
        names = list(arms)
        seconds, results = {name: 0.0 for name in arms}, {}
        for rep in range(args.repeats):
            for name in names[rep % 3 :] + names[: rep % 3]:
                took, results[name] = arms[name]()
                seconds[name] += took
        joint = results["one pass"]
        worst = max(
            ((results[arm][l].mom2[l] - joint.mom2[l]).norm() / joint.mom2[l].norm()).item()
            for arm in ("per layer", "per layer padded")
            for l in args.layers
        )
    one_s, per_s, padded_s = (seconds[name] / args.repeats for name in names)
    tokens = joint.meta["tokens"]
    print(
        f"threads={torch.get_num_threads()} layers={args.layers} documents={joint.meta['n_documents']} tokens={tokens} "
        f"repeats={args.repeats}"
    )
    print(
        f"one pass packed: {one_s:.1f} s ({tokens / one_s:.0f} tokens/s); per layer packed: {per_s:.1f} s; "
        f"per layer padded: {padded_s:.1f} s"
    )
    print(f"max relative |sum(one pass) - sum(per layer)|: {worst:.2e}")
    print(f"one pass alone (like for like, both packed): {per_s / one_s:.2f}x")
    print("below: per layer padded (the authors' layer_stats) time / one pass packed (muke's default) time")
    print(f"speedup: {padded_s / one_s:.2f}")


if __name__ == "__main__":
    main()
