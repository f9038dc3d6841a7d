"""Fast vs straightforward δ engine on the same model and requests (not a test; CI does not time it).

    python benchmarks/bench_deltas.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct --layer 8 --n 2

Prints seconds per request for both paths, the largest relative difference of z, and a last line
`speedup: X.XX` (straightforward time / fast time).
"""

import argparse
import time

import torch

from muke.data import load_requests
from muke.memory import MemoryConfig, optimise_request
from muke.model import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", default="resources/demo_edits.jsonl")
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--objective", default="matryoshka")
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()

    em = load(args.model)
    requests = load_requests(args.requests, "jsonl")[: args.n]
    seconds = {True: 0.0, False: 0.0}
    worst = 0.0
    for r in requests:
        z = {}
        for fast in (True, False):
            cfg = MemoryConfig(layer=args.layer, objective=args.objective, window=args.window,
                               v_num_grad_steps=args.steps, fast=fast)
            start = time.perf_counter()
            seq, result = optimise_request(em, r.question, r.answer, cfg)
            seconds[fast] += time.perf_counter() - start
            z[fast] = result.z
        worst = max(worst, ((z[True] - z[False]).norm() / z[False].norm()).item())
        print(f"{r.id}: {len(seq.target_ids)} target tokens, {seq.n_windows} windows", flush=True)
    n = len(requests)
    print(f"threads={torch.get_num_threads()} objective={args.objective} layer={args.layer}")
    print(f"straightforward: {seconds[False] / n:.1f} s/request; fast: {seconds[True] / n:.1f} s/request")
    print(f"max relative |z_fast - z_straightforward|: {worst:.2e}")
    print(f"speedup: {seconds[False] / seconds[True]:.2f}")


if __name__ == "__main__":
    main()
