"""How far bf16 forward passes move the second-moment statistics (not a test; CI does not run it).

    python benchmarks/stats_dtype_error.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct --layers 4 8

Collects the statistics of the same documents three ways: fp32 model (the reference), fp32 weights
under bf16 autocast (StatsConfig.dtype="bfloat16"), and the model loaded in bf16 (`muke stats --dtype
bfloat16`); the sums are fp32 in all three. Prints, per layer, the relative Frobenius error of C and of
the MEMIT solve A = (w·C + Ks Ksᵀ)⁻¹ Ks for the keys of a demo question (w = 15000). The last line is
`speedup: X.XX` = fp32 seconds / bf16-autocast seconds (below 1 on CPUs without native bf16).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from muke.engine.windows import encode
from muke.model import load
from muke.update.keys import read_layer
from muke.update.memit import memit_solve
from muke.update.stats import StatsConfig, collect_stats, load_stats


def collect(em, cfg, out):
    start = time.perf_counter()
    stats = load_stats(collect_stats(em, cfg, out, progress=False), em, cfg.layers)
    return stats, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", default="resources/demo_corpus.txt")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--max-docs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    em = load(args.model)
    base = dict(layers=tuple(args.layers), corpus=args.corpus, max_docs=args.max_docs)
    with tempfile.TemporaryDirectory() as tmp:
        ref, ref_s = collect(em, StatsConfig(**base), Path(tmp) / "fp32.safetensors")
        auto, auto_s = collect(em, StatsConfig(**base, dtype="bfloat16"), Path(tmp) / "autocast.safetensors")
        half_em = load(args.model, dtype="bfloat16")
        half, half_s = collect(half_em, StatsConfig(**base), Path(tmp) / "bf16.safetensors")
    seq = encode(em.tokenizer, "What is the city of Velmora known for?", "A port city.", em.end_of_turn, None)
    print(f"threads={torch.get_num_threads()} documents={ref.meta['n_documents']} tokens={ref.meta['tokens']}")
    print(f"seconds: fp32 {ref_s:.1f}, bf16 autocast {auto_s:.1f}, bf16 model {half_s:.1f}")
    for layer in args.layers:
        C = ref.second_moment(layer).double()
        Ks = read_layer(em, layer, layer, seq.input_ids)[0].T  # (d_ff, n) keys of the question
        A = memit_solve(C, Ks, Ks[:, :0], 15000.0, torch.float64)
        for name, other in (("bf16 autocast", auto), ("bf16 model", half)):
            Co = other.second_moment(layer).double()
            Ao = memit_solve(Co, Ks, Ks[:, :0], 15000.0, torch.float64)
            print(
                f"layer {layer} {name:>13}: |ΔC|/|C| = {((Co - C).norm() / C.norm()).item():.2e}, "
                f"|ΔA|/|A| = {((Ao - A).norm() / A.norm()).item():.2e}"
            )
    print(f"speedup: {ref_s / auto_s:.2f}")


if __name__ == "__main__":
    main()
