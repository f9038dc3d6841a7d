"""UnKE's stored ΔW in fp32 vs bf16 (hparams.unke_delta_dtype): file size and what it does to the answers
(not a test; CI does not run it).

    python benchmarks/unke_delta_dtype.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct \
        --preset smollm2-135m-instruct --request demo-00

Optimises one request's target memories once (muke-unke), computes the UnKE update with each delta dtype,
saves both, and answers the question greedily under each. Prints the file sizes, the largest relative
error of the bf16 parameter change, whether the greedy answers are identical, and the paper's character
BLEU of each answer against the target.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from muke.data import load_requests
from muke.engine.memory import MemoryConfig, optimise_request
from muke.eval.generate import greedy
from muke.eval.metrics import char_bleu
from muke.model import load
from muke.update.edit import compute_update
from muke.update.keys import Target
from muke.update.methods import resolve_method
from muke.update.weights import apply
from muke.workflow.config import load_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--preset", required=True, help="a preset name in config/models/")
    ap.add_argument("--requests", default="resources/demo_edits.jsonl")
    ap.add_argument("--request", default="demo-00")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--v-steps", type=int, default=None, help="δ steps (default: the preset's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    em = load(args.model)
    hparams = load_preset(args.preset)[1]["hparams"]
    if args.v_steps is not None:
        hparams["v_num_grad_steps"] = args.v_steps
    memory, backend, options = resolve_method("muke-unke", hparams)
    request = next(r for r in load_requests(args.requests, "jsonl") if r.id == args.request)
    start = time.perf_counter()
    seq, result = optimise_request(em, request.question, request.answer, MemoryConfig(**memory))
    print(f"target memories: {seq.n_windows} windows, {time.perf_counter() - start:.0f} s")
    target = Target(request.id, seq, result.z)

    updates, answers = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            update = compute_update(em, [target], backend, **{**options, "delta_dtype": dtype})
            size = update.save(Path(tmp) / f"{dtype}.safetensors").stat().st_size
            with apply(em, update):
                answers[dtype] = greedy(em, [request.question], args.max_new_tokens)[0].text
            updates[dtype] = update
            print(f"{dtype}: ΔW file {size / 2**20:.2f} MiB, char BLEU {char_bleu(answers[dtype], request.answer):.2f}")
    errors = [
        ((updates["bfloat16"].params[k].float() - v).norm() / v.norm()).item()
        for k, v in updates["float32"].params.items()
        if v.norm() > 0
    ]
    print(
        f"bf16 ΔW relative error (Frobenius, per parameter): max {max(errors):.2e}, mean {sum(errors) / len(errors):.2e}"
    )
    print(f"greedy answers identical: {answers['float32'] == answers['bfloat16']}")
    if answers["float32"] != answers["bfloat16"]:
        a, b = answers["float32"], answers["bfloat16"]
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"first difference at character {at}:\n  fp32: {a[at : at + 80]!r}\n  bf16: {b[at : at + 80]!r}")


if __name__ == "__main__":
    main()
