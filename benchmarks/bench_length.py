"""Cost and peak memory of δ optimisation vs target length (not a test; CI does not time it).

    python benchmarks/bench_length.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct \
        --lengths 64 128 256 384 512 --out benchmarks/results/length

For each length N, one request whose target (answer + end-of-turn) is exactly N tokens (the demo
answers concatenated and cut, bench_deltas.long_answer) is optimised in a fresh process (μKE
matryoshka objective, layer 8, W=20 by default), so that each length's peak memory is its own: on
CUDA the peak allocated tensor memory, on CPU the peak resident set size above the size after
loading the model and one forward pass (sampled every 5 ms). Writes <out>.csv (one row per length)
and <out>.png (seconds and peak MB vs tokens); the last line printed is `speedup: X.XX` = (seconds
per target token at the shortest length) / (seconds per target token at the longest), a number
below 1 meaning super-linear cost.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

QUESTION = "What is the city of Velmora known for?"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(args) -> dict:
    """Optimise one request of args.one target tokens in this process; a JSON line of the result."""
    import torch
    from bench_deltas import long_answer

    from muke.data import load_requests
    from muke.engine.memory import MemoryConfig, optimise_request
    from muke.model import load

    torch.set_num_threads(args.threads)
    em = load(args.model, device=args.device)
    answer = long_answer(em, [r.answer for r in load_requests(args.requests, "jsonl")], args.one)
    cfg = MemoryConfig(
        layer=args.layer,
        objective=args.objective,
        window=args.window,
        v_num_grad_steps=args.steps,
        affinity_steps=args.affinity_steps,
    )
    cuda = em.device.type == "cuda"
    with torch.no_grad():  # touch every weight page (safetensors are memory-mapped) before the baseline
        em.model(input_ids=torch.tensor([[0] * 8], device=em.device))
    peak, stop = [0], threading.Event()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    start = time.perf_counter()
    seq, result = optimise_request(em, QUESTION, answer, cfg)
    seconds = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
        peak_bytes = torch.cuda.max_memory_allocated() - base
    else:
        stop.set()
        sampler.join()
        peak_bytes = max(peak[0], rss_bytes()) - base
    return {
        "target_tokens": len(seq.target_ids),
        "prompt_tokens": len(seq.prompt_ids),
        "windows": seq.n_windows,
        "seconds": round(seconds, 2),
        "peak_mb": round(peak_bytes / 2**20, 1),
        "memory": "cuda allocated" if cuda else "cpu rss",
        "steps": args.steps,
        "affinity_steps": args.affinity_steps,
        "objective": args.objective,
        "layer": args.layer,
        "window": args.window,
        "threads": args.threads,
        "device": str(em.device),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["target_tokens"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(tokens, [r["seconds"] for r in rows], "o-")
    ax1.set(xlabel="target tokens", ylabel="seconds per request", title="δ optimisation time")
    ax2.plot(tokens, [r["peak_mb"] for r in rows], "o-", color="C1")
    ax2.set(xlabel="target tokens", ylabel=f"peak MB ({rows[0]['memory']})", title="peak memory")
    r = rows[0]
    fig.suptitle(
        f"{r['objective']}, layer {r['layer']}, W={r['window']}, {r['steps']} steps, "
        f"T_aff={r['affinity_steps']}, {r['device']}, {r['threads']} thread(s)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", default="resources/demo_edits.jsonl")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 384, 512])
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--objective", default="matryoshka")
    ap.add_argument("--steps", type=int, default=25, help="δ steps per window (v_num_grad_steps)")
    ap.add_argument("--affinity-steps", type=int, default=3, help="T_aff of the matryoshka λ")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/length")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args)), flush=True)
        return

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    passed = [a for a in sys.argv[1:]]
    for n in args.lengths:
        child = subprocess.run([sys.executable, __file__, *passed, "--one", str(n)], capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"length {n} failed:\n{child.stderr[-3000:]}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{r['target_tokens']:>4} target tokens, {r['windows']:>2} windows: {r['seconds']:8.1f} s, "
            f"peak {r['peak_mb']:7.1f} MB",
            flush=True,
        )
        with open(out.with_suffix(".csv"), "w", newline="") as f:  # rewritten after every length
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
    first, last = rows[0], rows[-1]
    per_token = [r["seconds"] / r["target_tokens"] for r in (first, last)]
    print(
        f"seconds per target token: {per_token[0]:.3f} at {first['target_tokens']}, "
        f"{per_token[1]:.3f} at {last['target_tokens']}"
    )
    print(f"speedup: {per_token[0] / per_token[1]:.2f}")


if __name__ == "__main__":
    main()
