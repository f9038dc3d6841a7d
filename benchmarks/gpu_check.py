"""A GPU check at the real size, ready to run on a machine with no internet (not a test; CI runs --tiny).

    PYTHONPATH=. python benchmarks/gpu_check.py            # CUDA: a random Qwen2.5-7B-Instruct, bf16, ≤ 8 min
    PYTHONPATH=. python benchmarks/gpu_check.py --tiny     # CPU: the same run on a tiny config (tests/test_gpu_check.py)
    PYTHONPATH=. python benchmarks/gpu_check.py --model ~/.cache/muke/models/SmolLM2-135M-Instruct --device cpu

Builds a randomly initialised model from Qwen2.5-7B-Instruct's config (all 28 layers, bf16; no weights
downloaded) and a byte-level BPE tokenizer trained on the spot (`muke.tiny.train_tokenizer`, 3000 ids, all
inside the model's vocabulary), then through the library's own functions: statistics on a few hundred
synthetic documents (sentences of the demo corpus, shuffled with a seed), AlphaEdit's null-space
projectors, and one μKE-MEMIT and one AlphaEdit edit of demo request 0 (affinity λ, δ steps, update,
generation). Then the straightforward paths of bench_deltas.py (`MemoryConfig.fast=False`: the whole model
at every δ step) and bench_generate.py (apply, answer, revert, one edit at a time) on the same request
and updates. Prints seconds and peak GPU memory per phase and the ratios `straightforward / fast`.

Fails loudly (exit 1, traceback) on any device or dtype error: every phase runs under
torch.cuda.synchronize, weights must stay bf16 on the device, z and ΔW must be finite fp32, the answers of
both generation paths must agree; exit 1 also when the run takes longer than --budget seconds.

Needs: torch + transformers (with what transformers itself installs: tokenizers, safetensors, tqdm, pyyaml,
numpy) and this checkout on PYTHONPATH; no other wheel, no Snakemake, lm-eval, bert-score or pandas (the
modules it imports do not import them; tests/test_gpu_check.py blocks them and runs --tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import resource
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

from muke.data import DEMO_CORPUS, RESOURCES, load_requests
from muke.engine import memory as memory_module
from muke.engine.memory import MemoryConfig, encode_request, optimise
from muke.eval.generate import edited_generation_rows, generation_rows
from muke.model import EditableModel, load
from muke.tiny import train_tokenizer
from muke.update.alphaedit import projector
from muke.update.edit import compute_update
from muke.update.keys import Target
from muke.update.memit import SOLVE_DTYPES
from muke.update.methods import resolve_method
from muke.update.stats import StatsConfig, collect_stats, load_stats
from muke.update.weights import apply

# Qwen2.5-7B-Instruct's config.json (the values that shape the computation)
QWEN25_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    max_position_embeddings=32768,
    hidden_act="silu",
)
# the same shape of computation, small: 10 layers so that layers 4-8 and l_WM = 8 exist; a vocabulary larger
# than the tokenizer's, as the real one is
TINY = {**QWEN25_7B, **dict(hidden_size=64, intermediate_size=176, num_hidden_layers=10, num_attention_heads=4)}
TINY.update(num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048)
METHODS = ("muke-memit", "alphaedit")


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """n documents of 8-20 sentences drawn (seeded) from the demo corpus's sentences."""
    sentences = [s for doc in DEMO_CORPUS.read_text(encoding="utf-8").split("\n\n") for s in doc.split(". ") if s]
    rng = random.Random(seed)
    return [". ".join(rng.sample(sentences, rng.randint(8, 20))) + "." for _ in range(n)]


def random_model(config: dict, corpus: Path, device: torch.device, dtype: torch.dtype) -> EditableModel:
    """A seeded random model of `config` built on the device, and a tokenizer trained on `corpus`."""
    tokenizer = train_tokenizer(corpus)
    if len(tokenizer) > config["vocab_size"]:
        raise SystemExit(f"tokenizer of {len(tokenizer)} ids does not fit the model's {config['vocab_size']}")
    ids = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**config, **ids), dtype=dtype)
    model.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    model.eval().requires_grad_(False)
    return EditableModel(model, tokenizer)


class Phases:
    """Wall and CPU seconds and peak device memory of named phases, printed as they end (the CPU seconds of
    a one-thread run are its time on an unshared core, when other jobs share the machine)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.cpu = device, {}, {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str):
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
            self.sync()
        except BaseException:
            print(f"FAILED in phase {name!r}", file=sys.stderr, flush=True)
            raise
        self.seconds[name], self.cpu[name] = time.perf_counter() - start, time.process_time() - cpu
        if self.device.type == "cuda":
            memory = f"peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:6.2f} GiB"
        else:
            memory = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:6.2f} GiB"
        print(f"{name:<56s} {self.seconds[name]:8.2f} s (CPU {self.cpu[name]:8.2f} s)   {memory}", flush=True)


@contextmanager
def cpu_seconds_of(module, name: str, total: list[float]):
    """Inside the block, add the CPU seconds of every call of module.<name> to total[0]."""
    real = getattr(module, name)

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            total[0] += time.process_time() - start

    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, real)


def check_model(em: EditableModel, device: torch.device, dtype: torch.dtype, where: str) -> None:
    for name, p in em.model.named_parameters():
        if p.device.type != device.type or p.dtype != dtype:
            raise SystemExit(f"{where}: parameter {name} is {p.dtype} on {p.device}, expected {dtype} on {device}")


def check_tensor(t: torch.Tensor, where: str) -> None:
    if t.dtype != torch.float32 or not torch.isfinite(t).all():
        raise SystemExit(f"{where}: {t.dtype} tensor, finite: {bool(torch.isfinite(t).all())}; expected finite fp32")


def edit_phases(em, request, method: str, stats, phase: Phases, preset: dict, max_new_tokens: int):
    """One edit end to end, phase by phase: affinity λ + δ steps, the update ΔW, generation."""
    memory, backend, options = resolve_method(method, preset)
    cfg = MemoryConfig(**memory)
    seq = encode_request(em, request.question, request.answer, cfg)
    affinity_cpu = [0.0]
    name = f"{method}: target memories z ({seq.n_windows} windows, {len(seq.target_ids)} tokens)"
    with phase(name), cpu_seconds_of(memory_module, "request_lambdas", affinity_cpu):
        result = optimise(em, seq, cfg)
    print(
        f"{'':<4s}affinity λ {result.affinity_seconds:.2f} s (CPU {affinity_cpu[0]:.2f} s), δ steps "
        f"{result.seconds - result.affinity_seconds:.2f} s (CPU {phase.cpu[name] - affinity_cpu[0]:.2f} s)"
    )
    check_tensor(result.z, f"{method} z")
    with phase(f"{method}: update ΔW ({backend})"):
        update = compute_update(em, [Target(request.id, seq, result.z)], backend, stats=stats, method=method, **options)
    for layer, (U, V) in update.factors.items():
        check_tensor(U, f"{method} layer {layer} U")
        check_tensor(V, f"{method} layer {layer} V")
    with phase(f"{method}: generation ({max_new_tokens} new tokens)"):
        rows = edited_generation_rows(
            em, [(update, [request])], kinds=["question", "para_question"], max_new_tokens=max_new_tokens
        )
    return seq, result, update, rows[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (fp32), fewer documents")
    ap.add_argument("--model", help="a local model folder instead of the random Qwen2.5-7B (fp32 on --device)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--docs", type=int, default=None, help="synthetic statistics documents (default 300; 40 --tiny)")
    ap.add_argument("--steps", type=int, default=25, help="δ steps (the paper's 25)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--autocast", choices=["bfloat16"], help="the δ passes under autocast (MemoryConfig.autocast)")
    ap.add_argument(
        "--bf16-attention",
        action="store_true",
        help="under --autocast, attention in bf16 too (MemoryConfig.fp32_attention false; flash kernels on GPUs)",
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--no-compare", action="store_true", help="skip the straightforward δ and generation paths")
    ap.add_argument("--budget", type=float, default=480.0, help="fail when the whole run takes longer (seconds)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU runs)")
    args = ap.parse_args(argv)

    begin = time.perf_counter()
    device = torch.device(args.device or ("cpu" if args.tiny or args.model else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny (or --device cpu) on a machine without one")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" and not args.model else torch.float32
    n_docs = args.docs or (40 if args.tiny else 300)
    work = Path(tempfile.mkdtemp(prefix="muke-gpu-check-"))
    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(synthetic_documents(n_docs)) + "\n", encoding="utf-8")
    print(
        f"torch {torch.__version__}, device {device}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f", {torch.get_num_threads()} threads"
        )
        + f", dtype {dtype}, {n_docs} statistics documents, {args.steps} δ steps, autocast {args.autocast}"
        + (", bf16 attention" if args.bf16_attention else ""),
        flush=True,
    )

    phase = Phases(device)
    with phase("model: " + (args.model or ("tiny Qwen2 config" if args.tiny else "random Qwen2.5-7B-Instruct"))):
        if args.model:
            em = load(args.model, device=str(device))
        else:
            em = random_model(TINY if args.tiny else QWEN25_7B, corpus, device, dtype)
    check_model(em, device, dtype, "after loading")
    print(f"{'':<4s}{sum(p.numel() for p in em.model.parameters()) / 1e9:.3f} B parameters, {em.n_layers} layers")

    preset = {"v_num_grad_steps": args.steps, **({"autocast": args.autocast} if args.autocast else {})}
    if args.bf16_attention:
        preset["fp32_attention"] = False
    layers = resolve_method("muke-memit", preset)[2]["layers"]
    with phase(f"statistics: layers {layers}, {n_docs} documents"):
        path = collect_stats(
            em, StatsConfig(layers=tuple(layers), corpus=str(corpus)), work / "stats.safetensors", progress=False
        )
        stats = load_stats(path, em, layers)
    with phase("alphaedit: null-space projectors (once per statistics)"):
        for layer in layers:
            projector(stats, layer, em.device, 2e-2, SOLVE_DTYPES["float32"])

    request = load_requests(RESOURCES / "demo_edits.jsonl", "jsonl")[0]
    if args.tiny:  # its first 30 words: a few windows, so the straightforward path stays short
        request = dataclasses.replace(request, answer=" ".join(request.answer.split()[:30]))
    edits = {m: edit_phases(em, request, m, stats, phase, preset, args.max_new_tokens) for m in args.methods}
    check_model(em, device, dtype, "after the edits")
    for method, (_, _, _, rows) in edits.items():
        print(f"{'':<4s}{method} answer: {rows[0]['output'][:100]!r}")

    ratios = {}
    if not args.no_compare:
        seq, fast, _, _ = edits["muke-memit"]
        memory, _, _ = resolve_method("muke-memit", preset)
        with phase("straightforward: muke-memit target memories z"):
            plain = optimise(em, seq, MemoryConfig(**{**memory, "fast": False}))
        ratios["δ optimisation (z)"] = (
            phase.seconds["straightforward: muke-memit target memories z"]
            / phase.seconds[f"muke-memit: target memories z ({seq.n_windows} windows, {len(seq.target_ids)} tokens)"]
        )
        worst = ((plain.z - fast.z).norm() / plain.z.norm()).item()
        print(f"{'':<4s}relative |z_fast - z_straightforward| = {worst:.2e}")

        updates = [(edit[2], [request]) for edit in edits.values()]
        kwargs = dict(kinds=["question", "para_question"], max_new_tokens=args.max_new_tokens)
        with phase("generation, both edits: apply-answer-revert"):
            sequential = []
            for update, rs in updates:
                with apply(em, update):
                    sequential += generation_rows(em, rs, **kwargs)
        with phase("generation, both edits: one batch, per-row updates"):
            batched = [row for rows in edited_generation_rows(em, updates, **kwargs) for row in rows]
        ratios["generation"] = (
            phase.seconds["generation, both edits: apply-answer-revert"]
            / phase.seconds["generation, both edits: one batch, per-row updates"]
        )
        differ = sum(a["output"] != b["output"] for a, b in zip(sequential, batched))
        print(f"{'':<4s}answers that differ between the two generation paths: {differ}/{len(batched)}")
        if differ and dtype == torch.float32:
            raise SystemExit("fp32 answers of the per-row and the apply-revert paths differ")
        check_model(em, device, dtype, "after generation")

    shutil.rmtree(work)
    total = time.perf_counter() - begin
    for name, ratio in ratios.items():
        print(f"ratio straightforward / fast, {name}: {ratio:.2f}x")
    print(f"total {total:.1f} s (budget {args.budget:.0f} s)")
    if total > args.budget:
        print(f"FAILED: the check took {total:.1f} s, over its budget of {args.budget:.0f} s", file=sys.stderr)
        return 1
    print("gpu_check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
