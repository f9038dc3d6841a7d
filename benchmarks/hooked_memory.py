"""Edit quality of the target memories alone: δ hooked in, no weight update.

For each objective: exact-match rate and mean token accuracy of greedy decoding against the target,
and seconds of δ optimisation per request.

    python benchmarks/hooked_memory.py --model PATH --layer 8 --window 20 --n 4
"""

import argparse
import time

import torch

from muke.data import load_requests
from muke.engine.memory import MemoryConfig, decode_with_shifts, optimise_request
from muke.engine.objectives import OBJECTIVES
from muke.model import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", default="resources/demo_edits.jsonl")
    ap.add_argument("--format", default="jsonl")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--v-lr", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES))
    args = ap.parse_args()

    em = load(args.model)
    requests = load_requests(args.requests, args.format)[: args.n]
    print(
        f"model={args.model} layer={args.layer} window={args.window} lr={args.v_lr} steps={args.steps} "
        f"requests={len(requests)} threads={torch.get_num_threads()}"
    )
    print(f"{'objective':<20}{'exact':>8}{'token acc':>11}{'s/request':>11}")
    for objective in args.objectives:
        cfg = MemoryConfig(
            layer=args.layer, objective=objective, window=args.window, v_lr=args.v_lr, v_num_grad_steps=args.steps
        )
        exact, acc, secs = 0, 0.0, 0.0
        for r in requests:
            start = time.perf_counter()
            seq, result = optimise_request(em, r.question, r.answer, cfg)
            secs += time.perf_counter() - start
            out, target = decode_with_shifts(em, seq, args.layer, result), list(seq.target_ids)
            exact += out == target
            acc += sum(a == b for a, b in zip(out, target)) / len(target)
        n = len(requests)
        print(f"{objective:<20}{exact / n:>8.2f}{acc / n:>11.3f}{secs / n:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
