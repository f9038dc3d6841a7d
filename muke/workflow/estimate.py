"""A memory and cost plan before anything runs (`muke estimate --configfile FILE`): per stage, its jobs,
the peak device (GPU) and host memory of one job and the GPU-hours of all of them, from the model's
widths (config.json, or `KNOWN_WIDTHS` for the presets' hub ids) and the run's sizes.

Memory is the sum of the tensors a job holds at its peak, as the stage code allocates them:
  weights        P · b                                  P parameters of b bytes (the model dtype)
  C (one layer)  d_ff² · 4                              fp32; the statistics file holds one per layer
  MEMIT solve    2 · d_ff² · 4 on the device            C streamed in, M = w·C + K Kᵀ, then LU(M)
  AlphaEdit P    4 · d_ff² · 4 on the device, once per layer (C, eigenvectors, U0, P = U0 U0ᵀ); the
                 solve then holds P, M = (P K) Kᵀ and LU(M); P is kept on the host between layers
  UnKE           4 copies of the edited blocks in fp32 (parameters, gradients, two AdamW moments)
plus the activations of the job's largest forward pass, and on the host the Python runtime
(`RUNTIME_BYTES`) and what the stage keeps there (the statistics a MEMIT update reads, the model while
it loads: from_pretrained builds it on the host before it moves to the device).

Time is a roofline: max(FLOPs / flops_per_s, bytes moved / bytes_per_s) per job, summed over a stage's
jobs; the rates are options (defaults: an H100-class card at a sustained fraction of its peak, bf16 /
fp16 matmuls four times as fast as fp32 ones). It is a
planning figure, good to a factor of about two; the memory figures are checked against measured peaks
(tests/test_estimate.py on CPU, `make rehearsal` at Qwen2.5-7B's widths), and `job_memory` gives each
job's for the workflow report, which sets them beside the peaks Snakemake measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
RUNTIME_BYTES = int(0.45 * GiB)  # python + torch + transformers + muke imported: 444 MiB on CPU (test_estimate)

# config.json values of the presets' hub ids (no hub access needed to plan)
KNOWN_WIDTHS = {
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=8192,
    ),
    "smollm2": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
}


@dataclass(frozen=True)
class Widths:
    """The sizes of a decoder-only model that its memory depends on."""

    model_type: str
    hidden: int
    d_ff: int
    n_layers: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied: bool
    context: int

    @classmethod
    def from_config(cls, c: dict) -> Widths:
        heads = c["num_attention_heads"]
        return cls(
            model_type=c.get("model_type", "llama"),
            hidden=c["hidden_size"],
            d_ff=c["intermediate_size"],
            n_layers=c["num_hidden_layers"],
            vocab=c["vocab_size"],
            n_heads=heads,
            n_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            tied=bool(c.get("tie_word_embeddings", False)),
            context=c.get("max_position_embeddings", 4096),
        )

    def block_params(self) -> int:
        """One decoder block: attention (q, k, v with qwen2's biases, o), the gated MLP, two norms."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        bias = q + 2 * kv if self.model_type == "qwen2" else 0
        return self.hidden * (q + 2 * kv) + bias + q * self.hidden + 3 * self.hidden * self.d_ff + 2 * self.hidden

    def params(self, layers: int | None = None) -> int:
        """Parameters of the whole model (or of its embedding and first `layers` blocks)."""
        if layers is not None:
            return self.vocab * self.hidden + layers * self.block_params()
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + self.n_layers * self.block_params() + self.hidden

    def token_activations(self, b: int) -> int:
        """Bytes of one token's activations inside one block's forward pass (b-byte dtype): the hidden
        state, q/k/v/attention output, the MLP's gate, up and product (sdpa attention: no T² term)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return b * (4 * self.hidden + 2 * q + 2 * kv + 3 * self.d_ff)


def widths_of(model, prepared_dir: str | Path | None = None) -> Widths:
    """A planned model's widths: the prepared folder's config.json, a local source's, the known table
    for a hub id, or the tiny recipe (muke.tiny)."""
    for folder in (prepared_dir, model.spec.params.get("source")):
        if folder and (Path(folder) / "config.json").is_file():
            return Widths.from_config(json.loads((Path(folder) / "config.json").read_text()))
    source = model.spec.params["source"]
    if source in KNOWN_WIDTHS:
        return Widths.from_config(KNOWN_WIDTHS[source])
    if source == "tiny":
        from muke.tiny import tiny_config

        class _Vocab:  # the tiny tokenizer's trained vocabulary size (muke.tiny.train_tokenizer)
            eos_token_id, pad_token_id = 2, 0

            def __len__(self):
                return 3000

        return Widths.from_config(tiny_config(model.spec.params["tiny"]["arch"], _Vocab()).to_dict())
    raise ValueError(
        f"model {model.name}: widths of {source!r} unknown: prepare it first, or give a local folder with config.json"
    )


# ---------------------------------------------------------------------------- per-job peaks


@dataclass
class JobCost:
    """One job's peak memory in bytes, run on a GPU (device, host) or on the CPU alone (cpu: device and
    host are one memory there), and its work (FLOPs, bytes read from device memory)."""

    device: int
    host: int
    cpu: int
    flops: float = 0.0
    traffic: float = 0.0


def collect_stats_cost(w: Widths, b: int, layers: list[int], batch_tokens: int, n_tokens: int) -> JobCost:
    """Weights, the fp32 sums Σ k kᵀ of every layer, and the larger of a batch's activations (with the
    fp32 copy of the keys) and, at each checkpoint, `mirror`'s three d_ff² temporaries; the forward pass
    stops after the last statistics layer. Host: the model while it loads, or the sums copied out for
    the checkpoint file."""
    sums = len(layers) * w.d_ff**2 * FP32
    weights = w.params() * b
    act = batch_tokens * (w.token_activations(b) + w.d_ff * FP32)
    device = weights + sums + max(act, 3 * w.d_ff**2 * FP32)
    flops = 2 * w.params(max(layers) + 1) * n_tokens + len(layers) * n_tokens * w.d_ff**2  # forward + half gram
    return JobCost(device, RUNTIME_BYTES + max(weights, sums), RUNTIME_BYTES + device, flops)


def update_cost(w: Widths, b: int, backend: str, layers: list[int], n_keys: int, steps: int, preserve: int) -> JobCost:
    """update_weights of one edit batch (n_keys edit positions; keys "sequence" read every position).

    MEMIT: the device holds one layer's C, M and LU(M); the host the sums of every layer (load_stats).
    AlphaEdit: computing P holds C, the eigenvectors, the eigensolver's workspace and then U0 and P
    (four d_ff² at most); the host keeps each layer's P besides the sums. UnKE: the edited blocks in fp32
    four times over (parameters, gradients, AdamW's two moments) and the activations of the edit and
    preservation sequences, forward and backward; the parameter differences go to the host."""
    weights, d2 = w.params() * b, w.d_ff**2 * FP32
    forward = 2 * w.params(max(layers) + 1) * n_keys * len(layers)
    if backend == "unke":
        block = w.block_params() * FP32 * len(layers)
        tokens = n_keys + preserve * 512
        act = tokens * w.token_activations(FP32) * 2
        flops = forward + 6 * w.block_params() * tokens * steps * len(layers)
        device = weights + 4 * block + act
        return JobCost(device, RUNTIME_BYTES + max(weights, block), RUNTIME_BYTES + device + block, flops)
    if backend == "memit":
        on_host, on_device = len(layers) * d2, 3 * d2
        flops = forward + len(layers) * (2 / 3) * w.d_ff**3
    else:
        on_host, on_device = 2 * len(layers) * d2, 4 * d2
        flops = forward + len(layers) * (10 * w.d_ff**3)  # eigh ~ 9 n³, P = U0 U0ᵀ, LU
    device = weights + on_device
    return JobCost(device, RUNTIME_BYTES + max(weights, on_host), RUNTIME_BYTES + device + on_host, flops)


def memories_cost(w: Widths, b: int, layer: int, answer_tokens: int, window: int, steps: int) -> JobCost:
    """The δ loop of one request: forward + backward from l_WM to the logits over prompt + answer,
    fp32 logits and their softmax, every step of every window (Matryoshka: the whole answer so far)."""
    tokens = 64 + answer_tokens
    weights = w.params() * b
    above = w.n_layers - layer
    act = tokens * (above * w.token_activations(b) * 2 + 3 * w.vocab * FP32)
    n_windows = max(1, math.ceil(answer_tokens / window))
    upper = above * w.block_params() + w.vocab * w.hidden
    flops = 6 * upper * tokens * (steps + 3) * n_windows
    device = weights + act
    return JobCost(device, RUNTIME_BYTES + weights, RUNTIME_BYTES + device, flops, weights * (steps + 3) * n_windows)


def generate_cost(w: Widths, b: int, batch: int, prompt: int, new_tokens: int, n_answers: int) -> JobCost:
    """Greedy decoding in batches: weights, the KV cache of a batch, the last position's fp32 logits;
    each step reads the weights once per batch (memory-bound)."""
    weights = w.params() * b
    kv = batch * (prompt + new_tokens) * w.n_layers * 2 * w.n_kv_heads * w.head_dim * b
    device = weights + kv + batch * w.vocab * FP32 * 2 + batch * prompt * w.token_activations(b)
    steps = math.ceil(n_answers / batch) * new_tokens
    flops = 2 * w.params() * n_answers * (prompt + new_tokens)
    return JobCost(device, RUNTIME_BYTES + weights, RUNTIME_BYTES + device, flops, weights * steps)


def locality_cost(w: Widths, b: int, batch: int, seq: int, n_models: int, n_tokens: int) -> JobCost:
    """lm-eval log-likelihoods: a batch of `seq`-token requests with fp32 logits at every position."""
    weights = w.params() * b
    device = weights + batch * seq * (w.vocab * FP32 * 2 + w.token_activations(b))
    flops = 2 * w.params() * n_tokens * n_models
    return JobCost(device, RUNTIME_BYTES + weights, RUNTIME_BYTES + device, flops, weights * n_models)


# ---------------------------------------------------------------------------- the plan


@dataclass
class StageEstimate:
    model: str
    stage: str
    jobs: int
    device_bytes: int  # peak of one job
    host_bytes: int
    gpu_hours: float  # all jobs
    gpu: bool = True


def _hours(cost: JobCost, flops_per_s: float, bytes_per_s: float) -> float:
    return max(cost.flops / flops_per_s, cost.traffic / bytes_per_s) / 3600


def _job_costs(plan, answer_tokens: int, doc_tokens: int):
    """Each stage spec of a plan as (model, stage, spec, cost, jobs): the peaks of one job, the work
    (FLOPs, traffic) of all `jobs` (its shards)."""
    seen_stats = set()
    for run in plan.runs:
        m = run.model
        w, b = widths_of(m, plan.model_dir(m)), DTYPE_BYTES[m.dtype]
        n_req, shards = len(run.dataset.request_ids), run.dataset.n_shards
        gen = run.generate.params["generation"]
        answers = n_req * len(gen["kinds"]) * 2
        cost = generate_cost(w, b, gen["batch_size"], 64, gen["max_new_tokens"], answers)
        yield m.name, "generate", run.generate, cost, shards
        if run.stats is not None and run.stats.identity not in seen_stats:
            seen_stats.add(run.stats.identity)
            p = run.stats.params
            length = min(p["max_length"] or w.context, doc_tokens)
            n_docs = p["max_docs"] or 100_000
            cost = collect_stats_cost(w, b, p["layers"], p["batch_tokens"], n_docs * length)
            yield m.name, "collect_stats", run.stats, cost, 1
        if run.memories is None:
            continue
        mem = run.memories.params["memory"]
        cost = memories_cost(w, b, mem["layer"], answer_tokens, mem["window"] or answer_tokens, mem["v_num_grad_steps"])
        cost.flops, cost.traffic = cost.flops * n_req, cost.traffic * n_req
        yield m.name, "optimize_memories", run.memories, cost, shards
        u = run.update.params
        layers, batch = u["options"]["layers"], u["edit_batch_size"]
        steps = u["options"].get("steps", 0)
        preserve = u["options"].get("n_preserve", 0)
        cost = update_cost(w, b, u["backend"], layers, (64 + answer_tokens) * batch, steps, preserve)
        cost.flops *= math.ceil(n_req / batch)
        yield m.name, "update_weights", run.update, cost, shards
        if run.locality is not None:
            yield m.name, "locality", run.locality, _locality(w, b, run.locality.params), 1
    for name, spec in plan.pre_edit_locality.items():
        m = plan.models[name]
        yield name, "locality", spec, _locality(widths_of(m, plan.model_dir(m)), DTYPE_BYTES[m.dtype], spec.params), 1


def _locality(w: Widths, b: int, loc: dict) -> JobCost:
    """A locality job: lm-eval of each model it checks, one per edit (the pre-edit job: the unedited model)."""
    tokens = 2_000_000 if loc["limit"] is None else int(loc["limit"] * 1000 * len(loc["tasks"]))
    return locality_cost(w, b, _batch(loc), 1024, len(loc["edits"]) or 1, tokens)


def estimate_plan(
    plan,
    answer_tokens: int = 300,
    doc_tokens: int = 700,
    flops_per_s: float = 200e12,
    bytes_per_s: float = 2.0e12,
    fp32_flops_per_s: float = 50e12,
) -> list[StageEstimate]:
    """Per model and stage of a muke.workflow.plan.Plan: jobs, the largest job's peaks and the GPU-hours of all.

    answer_tokens: tokens of a target answer (UnKEBench answers are a few hundred); doc_tokens: a statistics
    document's tokens before truncation (English Wikipedia averages several hundred)."""
    rows: dict[tuple[str, str], list[tuple[JobCost, int]]] = {}
    for model, stage, _, cost, jobs in _job_costs(plan, answer_tokens, doc_tokens):
        rows.setdefault((model, stage), []).append((cost, jobs))
    rates = {
        name: (flops_per_s if DTYPE_BYTES[m.dtype] == 2 else fp32_flops_per_s, bytes_per_s)
        for name, m in plan.models.items()
    }
    out = [
        StageEstimate(
            model,
            stage,
            sum(j for _, j in items),
            max(c.device for c, _ in items),
            max(c.host for c, _ in items),
            sum(_hours(c, *rates[model]) for c, _ in items),
        )
        for (model, stage), items in rows.items()
    ]
    order = ["collect_stats", "optimize_memories", "update_weights", "generate", "locality"]
    models = list(plan.models)
    return sorted(out, key=lambda s: (models.index(s.model), order.index(s.stage)))


def job_memory(plan, answer_tokens: int = 300, doc_tokens: int = 700) -> list[dict]:
    """Per job of a plan (a stage's shards share one entry): its rule, model and identity (which its
    Snakemake benchmark file's path names) and its peak memory in bytes: host_bytes and device_bytes
    run with a GPU, cpu_bytes run on the CPU alone."""
    out = {}
    for model, stage, spec, cost, _ in _job_costs(plan, answer_tokens, doc_tokens):
        out.setdefault(
            (stage, spec.identity),
            {
                "rule": stage,
                "model": model,
                "identity": spec.identity,
                "host_bytes": cost.host,
                "device_bytes": cost.device,
                "cpu_bytes": cost.cpu,
            },
        )
    return list(out.values())


def _batch(loc: dict) -> int:
    return loc["batch_size"] if isinstance(loc["batch_size"], int) else 8


def format_table(estimates: list[StageEstimate], gpu_bytes: float | None = None) -> str:
    """The estimate as a text table; with gpu_bytes, whether each stage's job fits that card."""
    width = max([5] + [len(s.model) for s in estimates])
    cols = f"{'jobs':>5} {'GPU GiB/job':>12} {'host GiB/job':>13} {'GPU-hours':>10}"
    lines = [f"{'model':<{width}} {'stage':<18} {cols}" + ("  fits" if gpu_bytes else "")]
    for s in estimates:
        gib = f"{s.device_bytes / GiB:>12.1f} {s.host_bytes / GiB:>13.1f}"
        line = f"{s.model:<{width}} {s.stage:<18} {s.jobs:>5} {gib} {s.gpu_hours:>10.2f}"
        if gpu_bytes:
            line += "  yes" if s.device_bytes <= gpu_bytes else "  NO"
        lines.append(line)
    total = sum(s.gpu_hours for s in estimates)
    lines.append(f"{'total':<{width}} {'':<18} {sum(s.jobs for s in estimates):>5} {'':>12} {'':>13} {total:>10.2f}")
    return "\n".join(lines)


def cmd_estimate(args) -> None:
    from muke.workflow.config import ROOT, load_yaml
    from muke.workflow.plan import Plan

    plan = Plan(load_yaml(args.configfile), basedir=ROOT)
    rows = estimate_plan(
        plan, args.answer_tokens, args.doc_tokens, args.tflops * 1e12, args.bandwidth * 1e12, args.tflops_fp32 * 1e12
    )
    print(f"{args.configfile}: {len(plan.runs)} runs; memory per job, GPU-hours of all jobs")
    print(format_table(rows, args.gpu_gib * GiB))


def add_estimate_parser(sub) -> None:
    p = sub.add_parser("estimate", help="per stage: jobs, peak GPU / host memory per job, GPU-hours (no model run)")
    p.add_argument("--configfile", required=True, help="the workflow config (as snakemake --configfile)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="card memory to check each job against")
    p.add_argument("--answer-tokens", type=int, default=300, help="tokens of a target answer")
    p.add_argument("--doc-tokens", type=int, default=700, help="tokens of a statistics document before truncation")
    p.add_argument("--tflops", type=float, default=200.0, help="sustained bf16 / fp16 TFLOP/s of one GPU")
    p.add_argument("--tflops-fp32", type=float, default=50.0, help="sustained fp32 TFLOP/s of one GPU")
    p.add_argument("--bandwidth", type=float, default=2.0, help="sustained device memory TB/s of one GPU")
    p.set_defaults(func=cmd_estimate)
