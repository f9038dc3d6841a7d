"""δ optimisation under bf16 autocast vs fp32 on the same model and requests (not a test).

    OMP_NUM_THREADS=1 python benchmarks/bench_autocast.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct --n 8

μKE-MEMIT's δ loop (matryoshka, l_WM = 8, window 20) of each request twice: fp32, then with
`MemoryConfig.autocast="bfloat16"` (matrix products in bf16; δ, Adam, log-probs, loss in fp32). Prints per
request the CPU seconds of both (with one thread: the time on an unshared core), the relative error of δ and of z (largest over windows) against fp32, the last
loss of each, and the character BLEU (the paper's family, ×100) of the greedy answer with the memory shifts
hooked in (`decode_with_shifts`, no weight update: what the memories carry) against the target; then
the means and a last line `speedup: X.XX` (fp32 CPU seconds / bf16 CPU seconds).
"""

import argparse
import dataclasses
import statistics
import time

import torch

from muke.data import RESOURCES, load_requests
from muke.engine.memory import MemoryConfig, decode_with_shifts, encode_request, optimise
from muke.eval.metrics import char_bleu
from muke.model import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", default=str(RESOURCES / "demo_edits.jsonl"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--offset", type=int, default=0, help="skip the first requests (to split a run over processes)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--words", type=int, default=None, help="cut every answer to its first N words")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    em = load(args.model)
    rows = []
    for request in load_requests(args.requests, "jsonl")[args.offset : args.offset + args.n]:
        if args.words:
            request = dataclasses.replace(request, answer=" ".join(request.answer.split()[: args.words]))
        out = {}
        for autocast in (None, "bfloat16"):
            cfg = MemoryConfig(layer=8, v_num_grad_steps=args.steps, autocast=autocast)
            seq = encode_request(em, request.question, request.answer, cfg)
            cpu = time.process_time()
            result = optimise(em, seq, cfg)
            cpu = time.process_time() - cpu
            answer = em.tokenizer.decode(decode_with_shifts(em, seq, cfg.layer, result), skip_special_tokens=True)
            out[autocast] = (result, cpu, char_bleu(answer.strip(), request.answer))
        (full, cpu_full, bleu_full), (half, cpu_half, bleu_half) = out[None], out["bfloat16"]
        row = dict(
            id=request.id,
            windows=seq.n_windows,
            fp32_cpu_s=cpu_full,
            bf16_cpu_s=cpu_half,
            delta_err=((half.delta - full.delta).norm(dim=-1) / full.delta.norm(dim=-1)).max().item(),
            z_err=((half.z - full.z).norm(dim=-1) / full.z.norm(dim=-1)).max().item(),
            loss_fp32=full.trace[-1]["loss"],
            loss_bf16=half.trace[-1]["loss"],
            bleu_fp32=bleu_full,
            bleu_bf16=bleu_half,
        )
        rows.append(row)
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], float)}
    print(f"threads={torch.get_num_threads()} steps={args.steps} words={args.words} requests={len(rows)}")
    print("means: " + "  ".join(f"{k}={v:.4g}" for k, v in mean.items()))
    print(
        f"largest z error {max(r['z_err'] for r in rows):.3g}, largest δ error {max(r['delta_err'] for r in rows):.3g}"
    )
    print(f"speedup: {mean['fp32_cpu_s'] / mean['bf16_cpu_s']:.2f}")


if __name__ == "__main__":
    main()
