"""One-pass vs per-layer second-moment statistics (not a test; CI does not time it).

    python benchmarks/bench_stats.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct --layers 4 5 6 7 8

Per-layer: one collection per layer, each forward pass stopping after that layer (ROME/MEMIT's
layer_stats with stop=True). One pass: a single collection hooking every layer, stopping after the
last. Both on the same documents with the same packing, --repeats times each in ABBA order (mean
seconds). Prints seconds, the largest relative difference of the sums, packed vs padded time of the
one-pass collection, and a last line `speedup: X.XX` (per-layer time / one-pass time).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from muke.model import load
from muke.stats import StatsConfig, collect_stats, load_stats


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

        def per_layer():
            runs = [timed(em, StatsConfig(layers=(l,), **base), tmp / f"layer{l}.safetensors") for l in args.layers]
            return sum(s for s, _ in runs), {l: stats for l, (_, stats) in zip(args.layers, runs)}

        # ABBA order over the repeats, so that a load that drifts on a shared machine hits both arms alike
        arms = {"one pass": one_pass, "per layer": per_layer}
        seconds, results = {name: 0.0 for name in arms}, {}
        for rep in range(args.repeats):
            for name in (("one pass", "per layer") if rep % 2 == 0 else ("per layer", "one pass")):
                took, results[name] = arms[name]()
                seconds[name] += took
        joint, singles = results["one pass"], results["per layer"]
        worst = max(((singles[l].mom2[l] - joint.mom2[l]).norm() / joint.mom2[l].norm()).item() for l in args.layers)
        padded_s, _ = timed(em, StatsConfig(layers=tuple(args.layers), pack=False, **base), tmp / "padded.safetensors")
    one_s, per_s = seconds["one pass"] / args.repeats, seconds["per layer"] / args.repeats
    tokens = joint.meta["tokens"]
    print(f"threads={torch.get_num_threads()} layers={args.layers} documents={joint.meta['n_documents']} tokens={tokens} "
          f"repeats={args.repeats}")
    print(f"per-layer passes: {per_s:.1f} s; one pass: {one_s:.1f} s ({tokens / one_s:.0f} tokens/s)")
    print(f"max relative |sum(one pass) - sum(per layer)|: {worst:.2e}")
    print(f"one pass padded (pack=False): {padded_s:.1f} s; packed: {one_s:.1f} s; packing speedup {padded_s / one_s:.2f}")
    print(f"speedup: {per_s / one_s:.2f}")


if __name__ == "__main__":
    main()
