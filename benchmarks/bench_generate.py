"""Answering many single-request edits: one batch with per-row low-rank updates vs edit-generate-revert
one request at a time (not a test; CI does not time it).

    python benchmarks/bench_generate.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct --n 16

Updates are real: plain MEMIT (one δ at the last question token, layers 4-8, statistics of the demo
corpus), saved under --cache and reused by later runs. Both arms answer the same questions greedily;
the benchmark prints the seconds of each arm (summed over --repeats runs in ABBA order), how many
answers differ between them (0 expected: the per-row path computes W x + U (Vᵀ x) where the
sequential one computes (W + U Vᵀ) x, equal up to fp rounding), and a last line `speedup: X.XX`
(sequential time / batched time).

Bound: on CPU the batched arm is compute bound: one decoding row costs ~4-5 ms on one SmolLM2 thread when
all 78 rows share one batch (matrix products of 78 rows run at ~90% of the core's peak, of 32 rows at ~70%,
of a request's own ~5 rows at ~25%: there weight reads dominate), against ~25 ms per row in a request's own
batch; both arms run the same prompt prefill (~40 tokens per answer), which batching does not shorten.
Batches of 32 (3 batches, the last of 14 rows) measured 2.7-3.7x.
"""

import argparse
import time
from pathlib import Path

import torch

from muke.data import load_requests
from muke.eval.generate import KINDS, edited_generation_rows, generation_rows
from muke.model import load
from muke.update.edit import edit
from muke.update.stats import StatsConfig, cached_stats
from muke.update.weights import WeightUpdate, apply


def updates_for(em, requests, cache: Path, steps: int) -> list[WeightUpdate]:
    preset = {"v_num_grad_steps": steps}
    stats = None
    out = []
    for r in requests:
        path = cache / f"{r.id}-memit-{steps}.safetensors"
        if not path.exists():
            if stats is None:
                stats = cached_stats(
                    em, StatsConfig(layers=(4, 5, 6, 7, 8), corpus="resources/demo_corpus.txt"), progress=False
                )
            start = time.perf_counter()
            update, _ = edit(em, [r], "memit", preset, stats)
            update.save(path)
            print(f"{r.id}: MEMIT update in {time.perf_counter() - start:.1f} s", flush=True)
        out.append(WeightUpdate.load(path))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", default="resources/demo_edits.jsonl")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="rows per generate call of the batched arm (default: all 78 answers of 16 demo requests in one)",
    )
    ap.add_argument("--steps", type=int, default=25, help="δ steps of the MEMIT edits")
    ap.add_argument("--cache", default=str(Path("~/.cache/muke/bench_generate").expanduser()))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each arm, in ABBA order; times are summed")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    em = load(args.model)
    requests = load_requests(args.requests, "jsonl")[: args.n]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    updates = updates_for(em, requests, cache, args.steps)
    kwargs = dict(kinds=args.kinds, max_new_tokens=args.max_new_tokens)

    def sequential():
        rows = []
        for update, r in zip(updates, requests):
            with apply(em, update):
                rows += generation_rows(em, [r], batch_size=8, **kwargs)
        return rows

    def batched():
        edits = [(u, [r]) for u, r in zip(updates, requests)]
        return [row for rows in edited_generation_rows(em, edits, batch_size=args.batch_size, **kwargs) for row in rows]

    # ABBA order over the repeats, so that a load that drifts on a shared machine hits both arms alike
    arms = {"sequential": sequential, "batched": batched}
    seconds, outputs = {name: 0.0 for name in arms}, {}
    for rep in range(args.repeats):
        for name in ("sequential", "batched") if rep % 2 == 0 else ("batched", "sequential"):
            start = time.perf_counter()
            outputs[name] = arms[name]()
            seconds[name] += time.perf_counter() - start
    seq_s, batch_s = seconds["sequential"], seconds["batched"]
    sequential, batched = outputs["sequential"], outputs["batched"]

    differ = sum((a["output"], a["n_tokens"]) != (b["output"], b["n_tokens"]) for a, b in zip(sequential, batched))
    tokens = sum(row["n_tokens"] for row in batched)
    print(
        f"threads={torch.get_num_threads()} requests={len(requests)} answers={len(batched)} kinds={args.kinds} "
        f"max_new_tokens={args.max_new_tokens} batch_size={args.batch_size} generated tokens={tokens} "
        f"repeats={args.repeats}"
    )
    print(f"sequential edit-generate-revert: {seq_s:.1f} s; batched per-row updates: {batch_s:.1f} s")
    print(f"answers that differ between the arms: {differ}/{len(batched)}")
    print(f"speedup: {seq_s / batch_s:.2f}")


if __name__ == "__main__":
    main()
