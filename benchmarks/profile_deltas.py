"""torch.profiler tables of one request's δ optimisation (affinity λ + δ steps; not a test).

    OMP_NUM_THREADS=1 python benchmarks/profile_deltas.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct

The paper's settings (μKE-MEMIT: matryoshka objective, l_WM = 8, window 20, 25 δ steps, lr 0.5), demo
request 0, the fast path, one thread. Prints the top operators by self CPU time, then the same grouped by
input shapes (which tells the LM head's matrix products, (n, d) × (vocab, d), from the layers'). docs/PERF.md
quotes its output.
"""

import argparse
import dataclasses
import time

import torch
from torch.profiler import ProfilerActivity, profile

from muke.data import RESOURCES, load_requests
from muke.engine.memory import MemoryConfig, encode_request, optimise
from muke.model import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--request", type=int, default=0, help="index in resources/demo_edits.jsonl")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--autocast", default=None, help="MemoryConfig.autocast (e.g. bf16)")
    ap.add_argument("--words", type=int, default=None, help="cut the answer to its first N words")
    ap.add_argument("--shapes", action="store_true", help="also a table grouped by input shapes (slow, memory-hungry)")
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    em = load(args.model)
    request = load_requests(RESOURCES / "demo_edits.jsonl", "jsonl")[args.request]
    if args.words:
        request = dataclasses.replace(request, answer=" ".join(request.answer.split()[: args.words]))
    options = {"autocast": args.autocast} if args.autocast else {}
    cfg = MemoryConfig(layer=8, v_num_grad_steps=args.steps, **options)
    seq = encode_request(em, request.question, request.answer, cfg)
    start, cpu = time.perf_counter(), time.process_time()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        result = optimise(em, seq, cfg)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    steps = sum(1 for row in result.trace)
    print(
        f"{request.id}: {len(seq.target_ids)} target tokens, {seq.n_windows} windows, {steps} δ steps in all; "
        f"{wall:.1f} s wall, {cpu:.1f} s CPU under the profiler (affinity {result.affinity_seconds:.1f} s wall), "
        f"threads={torch.get_num_threads()}, autocast={args.autocast}"
    )
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))
    if not args.shapes:
        return
    by_shape = prof.key_averages(group_by_input_shape=True)
    print(
        by_shape.table(
            sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=30, max_shapes_column_width=60
        )
    )


if __name__ == "__main__":
    main()
