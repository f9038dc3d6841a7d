"""Fast vs straightforward δ engine on the same model and requests (not a test; CI does not time it).

    python benchmarks/bench_deltas.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct --layer 8 --n 2
    python benchmarks/bench_deltas.py --model ... --target-tokens 200    # longer targets: answers concatenated
    python benchmarks/bench_deltas.py --model ... --n 2 --batch         # fast arm: the requests in one batch
    python benchmarks/bench_deltas.py --model ... --autocast bfloat16   # fast arm as the CPU presets run it

Prints seconds per request for both paths, split into the affinity λ and the rest (the δ steps), the
largest relative difference of z, and a last line `speedup: X.XX` (straightforward time / fast time).

Bound: an optimisation step of window i must run the layers above l_WM and the LM head, forward and
backward, on every position from window i's hook on (all of them carry loss for μKE); the straightforward
step runs every layer forward on the whole sequence and the layers above l_WM backward. For SmolLM2,
l_WM = 8 and 200 target tokens that is ~2.4× fewer multiply-adds per step on average. On one CPU core
the time per step is ~0.2 s + ~4 ms per suffix token (the constant: reading 0.4 GB of weights forward and
again backward at ~5 GB/s, and per-op overhead), so short suffixes gain less than their FLOPs: the steps
come out ~1.9× faster, the affinity (one shared, chunked pass per step instead of one full pass per
figure) ~4.5×. --batch shares each step's weight reads among the requests (per-request step time at the
last window, 20 tokens: 279 → 154 ms for 4 requests; first window, 200 tokens: 1039 → 887 ms).
z differs between the paths by rounding amplified over 25 Adam steps that have not converged; on the
tiny model the tests hold them within 1e-5.
"""

import argparse
import time

import torch

from muke.data import EditRequest, load_requests
from muke.engine.memory import MemoryConfig, encode_request, optimise, optimise_batch
from muke.model import load


def long_answer(em, answers: list[str], n_tokens: int) -> str:
    """The answers joined and cut so that the target (answer + end-of-turn) is n_tokens long."""
    tok = em.tokenizer
    ids = tok(" ".join(answers), add_special_tokens=False)["input_ids"]
    k = n_tokens - 1
    for _ in range(10):
        answer = tok.decode(ids[:k]).strip()
        got = len(tok(answer + em.end_of_turn, add_special_tokens=False)["input_ids"])
        if got == n_tokens:
            return answer
        k += n_tokens - got
    raise ValueError(f"could not cut an answer of {n_tokens} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", default="resources/demo_edits.jsonl")
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--objective", default="matryoshka")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument(
        "--target-tokens",
        type=int,
        default=None,
        help="cut every target to this many tokens (answer + end-of-turn): request i's answer "
        "followed by the next requests' answers",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--batch",
        action="store_true",
        help="the fast arm optimises the --n requests in one batch (memory.optimise_batch); "
        "the straightforward arm always runs them one at a time",
    )
    ap.add_argument(
        "--autocast",
        choices=["bfloat16"],
        help="the fast arm under autocast (MemoryConfig.autocast; the CPU presets' default); the straightforward "
        "arm stays in the model's dtype, as the authors' code runs",
    )
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    em = load(args.model)
    every = load_requests(args.requests, "jsonl")
    requests = every[: args.n]
    if args.target_tokens:
        requests = [
            EditRequest(
                r.id, r.question, long_answer(em, [a.answer for a in every[i:] + every[:i]], args.target_tokens)
            )
            for i, r in enumerate(requests)
        ]

    def config(fast):
        return MemoryConfig(
            layer=args.layer,
            objective=args.objective,
            window=args.window,
            v_num_grad_steps=args.steps,
            fast=fast,
            autocast=args.autocast if fast else None,
        )

    seqs = [encode_request(em, r.question, r.answer, config(True)) for r in requests]
    seconds, affinity, z = {}, {}, {}  # affinity: the part of `seconds` spent on the affinity λ
    start = time.perf_counter()
    if args.batch:
        results = optimise_batch(em, seqs, config(True))
        print(f"fast, {len(seqs)} requests in one batch: {time.perf_counter() - start:.1f} s", flush=True)
    else:
        results = []
        for r, seq in zip(requests, seqs):
            results.append(optimise(em, seq, config(True)))
            print(f"{r.id}: fast {results[-1].seconds:.1f} s", flush=True)
    seconds[True] = time.perf_counter() - start
    affinity[True] = sum(res.affinity_seconds for res in results)
    z[True] = [res.z for res in results]
    seconds[False], affinity[False], z[False] = 0.0, 0.0, []
    for r, seq in zip(requests, seqs):
        res = optimise(em, seq, config(False))
        seconds[False] += res.seconds
        affinity[False] += res.affinity_seconds
        z[False].append(res.z)
        print(
            f"{r.id}: {len(seq.target_ids)} target tokens, {seq.n_windows} windows: straightforward "
            f"{res.seconds:.1f} s",
            flush=True,
        )
    worst = max(((a - b).norm() / b.norm()).item() for a, b in zip(z[True], z[False]))
    n = len(requests)
    print(
        f"threads={torch.get_num_threads()} objective={args.objective} layer={args.layer} requests={n} "
        f"fast arm {'batched (optimise_batch)' if args.batch else 'one request at a time'}, autocast {args.autocast}"
    )
    print(f"straightforward: {seconds[False] / n:.1f} s/request; fast: {seconds[True] / n:.1f} s/request")
    steps = {fast: seconds[fast] - affinity[fast] for fast in seconds}
    if affinity[False]:
        print(
            f"affinity λ: straightforward {affinity[False] / n:.1f} s, fast {affinity[True] / n:.1f} s "
            f"({affinity[False] / affinity[True]:.2f}x); δ steps and the rest: straightforward {steps[False] / n:.1f} s, "
            f"fast {steps[True] / n:.1f} s ({steps[False] / steps[True]:.2f}x)"
        )
    print(f"max relative |z_fast - z_straightforward|: {worst:.2e}")
    print(f"speedup: {seconds[False] / seconds[True]:.2f}")


if __name__ == "__main__":
    main()
