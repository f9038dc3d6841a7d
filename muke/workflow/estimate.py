"""A memory and cost plan before anything runs (`muke estimate --configfile FILE`): per stage, its jobs,
the peak device (GPU) and host memory of one job and the GPU-hours of all of them, from the model's
widths (config.json, or `KNOWN_WIDTHS` for the presets' hub ids) and the run's sizes.

Memory is the sum of the tensors a job holds at its peak, as the stage code allocates them (each cost
function names the lines it follows):
  weights        P · b on a GPU; on the CPU the pages of the memory-mapped checkpoint the job reads
                 (`resident_weights`: not the blocks above the last layer a forward pass reaches, not
                 the head where no logits are computed, of the embedding only its tokens' rows)
  C (one layer)  d_ff² · 4                              fp32; the statistics file holds one per layer
  MEMIT solve    3 · d_ff² · 4: C streamed in, M = w·C + K Kᵀ, LU(M); the statistics of every layer
                 stay resident once read
  AlphaEdit P    4 · d_ff² · 4 once per layer (C, eigh's eigenvectors and 2 · d_ff² of workspace); the
                 P of every layer is kept (on the host of a GPU run)
  UnKE           an fp32 copy of one edited block, its gradients and AdamW's two moments, plus the
                 larger of a step's activations and the optimiser's temporaries
  edits          the edited parameters' clones (restored on exit); generate: each answered edit's merged
                 weights (MEMIT family, bf16 / fp16) or block differences and clones (UnKE)
plus the activations of the job's largest forward pass, and on the host the Python runtime
(`RUNTIME_BYTES`) and what the stage keeps there (the statistics a MEMIT update reads, the model while
it loads: from_pretrained builds it on the host before it moves to the device). On a CPU in bf16 the LM
head run on a slice of positions is copied first (`head_copy`).

The token lengths come from the run's requests where the model is prepared (`job_memory`, which the
report and benchmarks/rehearsal.py compare with measured peaks); `muke estimate` plans with answers of
`--answer-tokens` (UnKEBench's are a few hundred).

Time is a roofline: max(FLOPs / flops_per_s, bytes moved / bytes_per_s) per job, summed over a stage's
jobs; the rates are options (defaults: an H100-class card at a sustained fraction of its peak, bf16 /
fp16 matmuls four times as fast as fp32 ones). It is a
planning figure, good to a factor of about two; the memory figures are checked against measured peaks
(tests/test_estimate.py on CPU, `make rehearsal` at Qwen2.5-7B's widths: docs/REHEARSAL.md), and
`job_memory` gives each job's for the workflow report, which sets them beside the peaks Snakemake
measured.
"""

from __future__ import annotations

import functools
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
    stored_dtype: str | None = None  # the checkpoint's dtype (config.json), None where it states none

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
            stored_dtype=c.get("dtype") or c.get("torch_dtype"),
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


def resident_weights(w: Widths, dtype: str, blocks: int, head: bool, mapped: bool = True) -> int:
    """The weights a CPU job keeps in its resident set. transformers 5 loads a safetensors checkpoint
    stored in the dtype it runs in as tensors backed by the file's memory map (muke.model.load: nothing
    is copied), so only the pages a job reads become resident: the `blocks` decoder blocks its forward
    passes run, the final norm and LM head where it computes logits (`head`; a tied head is the whole
    embedding matrix), and of an untied embedding only the rows of its tokens (left out). A checkpoint
    converted while loading (`mapped` false: stored in another dtype) is resident whole."""
    b = DTYPE_BYTES[dtype]
    if not mapped:
        return w.params() * b
    return (blocks * w.block_params() + (w.vocab * w.hidden + w.hidden if head else 0)) * b


def head_copy(w: Widths, dtype: str) -> int:
    """A CPU bf16 job that runs the LM head on a slice of positions (generate's prefill keeps the last
    position's logits, transformers' logits_to_keep; the affinity pass of muke.engine.forward.target_states):
    torch's matmul does not fold a 3-D input whose batch stride is not rows × row stride into one
    matrix product but runs bmm on the broadcast weight, and the CPU bf16 bmm copies that weight first:
    a transient vocab × hidden copy of the head (measured: 148.5 MiB for a 152064 × 512 head; not for
    fp16 or fp32, nor for contiguous inputs)."""
    return w.vocab * w.hidden * DTYPE_BYTES[dtype] if dtype == "bfloat16" else 0


def logit_bytes(dtype: str) -> int:
    """Bytes per (position, vocabulary entry) while muke.engine.logprob.target_logprobs runs: the logits
    in the model dtype, their fp32 copy (none when already fp32) and logsumexp's fp32 x - max."""
    b = DTYPE_BYTES[dtype]
    return b + FP32 * (2 if b < FP32 else 1)


def collect_stats_cost(
    w: Widths, dtype: str, layers: list[int], batch_tokens: int, n_tokens: int, mapped: bool = True
) -> JobCost:
    """Weights, the fp32 sums Σ k kᵀ of every layer (muke.update.stats.collect_stats), and the larger of
    a batch's activations (with the fp32 copy of the keys) and, when the file is written, `mirror`'s three
    d_ff² temporaries (triu(), triu(1) and their sum). The forward pass stops after the last statistics
    layer, so on the CPU only blocks 0..max(layers) are read. Host (GPU run): the model while it loads,
    or the sums copied out for the file."""
    b = DTYPE_BYTES[dtype]
    sums = len(layers) * w.d_ff**2 * FP32
    weights = w.params() * b
    work = max(batch_tokens * (w.token_activations(b) + w.d_ff * FP32), 3 * w.d_ff**2 * FP32)
    device = weights + sums + work
    cpu = RUNTIME_BYTES + resident_weights(w, dtype, max(layers) + 1, False, mapped) + sums + work
    flops = 2 * w.params(max(layers) + 1) * n_tokens + len(layers) * n_tokens * w.d_ff**2  # forward + half gram
    return JobCost(device, RUNTIME_BYTES + max(weights, sums), cpu, flops)


def update_cost(
    w: Widths,
    dtype: str,
    backend: str,
    layers: list[int],
    n_keys: int,
    steps: int,
    preserve: int,
    delta_dtype: str = "float32",
    mapped: bool = True,
) -> JobCost:
    """update_weights of one edit batch (n_keys edit positions; keys "sequence" read every position).
    Keys are read by forward passes that stop at l_WM = max(layers) (muke.update.keys.read_layer,
    unke.record_block): on the CPU only blocks 0..l_WM are read. Every backend first clones the
    parameters it edits (muke.update.keys.preserved) to restore them on exit.

    MEMIT (memit.memit_solve, per layer): C streamed from the statistics, M = w·C + K Kᵀ and
    torch.linalg.solve's LU copy of M, three d_ff² besides the statistics of every layer, which are read
    through the file's memory map and stay resident once read (on the CPU all of them by the last layer).
    AlphaEdit: computing P (alphaedit.null_space_projector) holds C, eigh's eigenvectors and its LAPACK
    workspace of 2·d_ff² (syevd, measured), four d_ff²; the P of every earlier layer is kept
    (stats.cache), so the CPU's peak is the last layer's: L statistics + (L - 1) P + 4.
    UnKE (unke.fit_block, one layer at a time): an fp32 copy of the block, its gradients and AdamW's two
    moments, plus the larger of a step's activations (edit and preservation sequences, forward and
    backward) and the optimiser's temporaries: on the CPU (single-tensor AdamW) exp_avg_sq.sqrt() and the
    quotient of the parameter being updated while the previous parameter's denominator is still bound,
    three of the largest parameter (measured); on a GPU (foreach AdamW) one sqrt per parameter, a block.
    The parameter differences of the earlier layers are kept, on the host (delta_dtype)."""
    b = DTYPE_BYTES[dtype]
    weights, d2 = w.params() * b, w.d_ff**2 * FP32
    read = resident_weights(w, dtype, max(layers) + 1, False, mapped)
    forward = 2 * w.params(max(layers) + 1) * n_keys * len(layers)
    if backend == "unke":
        block, delta = w.block_params(), DTYPE_BYTES[delta_dtype]
        fit = 4 * block * FP32
        tokens = n_keys + preserve * 512  # preservation samples are truncated at 512 tokens (unke_update)
        act = tokens * w.token_activations(FP32) * 2
        largest = w.hidden * w.d_ff * FP32
        kept = len(layers) * block * b  # the edited blocks' originals
        earlier = (len(layers) - 1) * block * delta
        flops = forward + 6 * block * tokens * steps * len(layers)
        device = weights + kept + fit + max(act, block * FP32)
        host = RUNTIME_BYTES + max(weights, len(layers) * block * delta)
        cpu = RUNTIME_BYTES + read + kept + earlier + fit + max(act, 3 * largest)
        return JobCost(device, host, cpu, flops)
    kept = len(layers) * w.hidden * w.d_ff * b  # the down-projections' originals
    L = len(layers)
    if backend == "memit":
        on_device, on_host, on_cpu = 3 * d2, L * d2, (L + 3) * d2
        flops = forward + L * (2 / 3) * w.d_ff**3
    else:
        on_device, on_host, on_cpu = 4 * d2, 2 * L * d2, (2 * L + 3) * d2
        flops = forward + L * (10 * w.d_ff**3)  # eigh ~ 9 n³, P = U0 U0ᵀ, LU
    device = weights + kept + on_device
    return JobCost(device, RUNTIME_BYTES + max(weights, on_host), RUNTIME_BYTES + read + kept + on_cpu, flops)


def memories_cost(
    w: Widths,
    dtype: str,
    layer: int,
    prompt_tokens: int,
    answer_tokens: int,
    window: int,
    steps: int,
    sliced_head: bool = True,
    mapped: bool = True,
) -> JobCost:
    """The δ loop of one request (muke.engine.forward.CachedShiftedLM): layers 0..l_WM run once and are
    replayed (hooks.replay_lower_layers), each step runs the layers above l_WM and the LM head over the
    answer (Matryoshka: the answer so far) and backward: the logits and target_logprobs' fp32 buffers
    over the answer (`logit_bytes`), the upper layers' activations and their gradients, the KV cache of
    the sequence. Every block and the head are read. Where the head runs on a slice of positions
    (`sliced_head`: Matryoshka's affinity pass, forward.target_states with logits_to_keep=1 and
    ShiftedLM.nll_gradients; every pass of the plain path, fast false) a CPU bf16 job also holds the
    head's transient copy (`head_copy`) with one pass's logits."""
    b = DTYPE_BYTES[dtype]
    weights = w.params() * b
    upper = w.n_layers - layer - 1
    act = answer_tokens * (w.vocab * logit_bytes(dtype) + 2 * upper * w.token_activations(b))
    tokens = prompt_tokens + answer_tokens
    kv = tokens * w.n_layers * 2 * w.n_kv_heads * w.head_dim * b
    copy = head_copy(w, dtype) + answer_tokens * w.vocab * b if sliced_head and head_copy(w, dtype) else 0
    n_windows = max(1, math.ceil(answer_tokens / window))
    flops = 6 * (upper * w.block_params() + w.vocab * w.hidden) * tokens * (steps + 3) * n_windows
    cpu = RUNTIME_BYTES + resident_weights(w, dtype, w.n_layers, True, mapped) + kv + max(act, copy)
    return JobCost(weights + act + kv, RUNTIME_BYTES + weights, cpu, flops, weights * (steps + 3) * n_windows)


@dataclass(frozen=True)
class Edit:
    """What the edits answered by one generate batch are (muke.eval.generate.edited_generation_rows).
    low_rank_layers: layers of a factored ΔW (MEMIT family); dense_blocks: decoder blocks whose every
    parameter a parameter-difference ΔW (UnKE) changes, in `delta_dtype`; updates: the edits of one
    generate batch (their ΔW files are all loaded for it)."""

    low_rank_layers: int = 0
    dense_blocks: int = 0
    delta_dtype: str = "float32"
    updates: int = 1


def edit_bytes(w: Widths, dtype: str, edit: Edit | None) -> tuple[int, int, int]:
    """(bytes the answered edits hold on the device while a batch decodes, the device's peak while one
    is put in place, what they hold on the host).

    Factored ΔW in bf16 / fp16 (generate.row_updates' merged hooks): each edit's merged d_model × d_ff
    weight per layer, built by muke.update.weights.apply: the parameter's clone (keys.preserved), U Vᵀ in
    fp32 and its cast, then the merged clone. In fp32 the low-rank hooks hold only the factors (left out).
    Parameter differences (UnKE, applied and reverted one edit at a time): the blocks' clones on the
    device, and while `add` runs ΔW of the largest parameter there with p.float() and p.float() + ΔW; the
    differences of every edit of the batch stay on the host (read through the file's memory map)."""
    if edit is None:
        return 0, 0, 0
    b = DTYPE_BYTES[dtype]
    matrix = w.hidden * w.d_ff
    if edit.dense_blocks:
        delta = DTYPE_BYTES[edit.delta_dtype]
        held = edit.dense_blocks * w.block_params() * b
        return held, held + matrix * (delta + 2 * FP32), edit.updates * edit.dense_blocks * w.block_params() * delta
    if edit.low_rank_layers and b < FP32:
        held = edit.updates * edit.low_rank_layers * matrix * b
        return held, held + matrix * (FP32 + b), 0
    return 0, 0, 0


def generate_cost(
    w: Widths,
    dtype: str,
    batch: int,
    prompt: int,
    new_tokens: int,
    n_answers: int,
    edit: Edit | None = None,
    mapped: bool = True,
) -> JobCost:
    """Greedy decoding in batches: weights, the KV cache of a batch, the last position's fp32 logits,
    the prefill's activations, what the answered edits hold (`edit_bytes`); on a CPU in bf16 the
    prefill's head copy (`head_copy`). Each step reads the weights once per batch (memory-bound)."""
    b = DTYPE_BYTES[dtype]
    weights = w.params() * b
    kv = batch * (prompt + new_tokens) * w.n_layers * 2 * w.n_kv_heads * w.head_dim * b
    decode = kv + batch * w.vocab * FP32 * 2 + batch * prompt * w.token_activations(b)
    held, applying, on_host = edit_bytes(w, dtype, edit)
    steps = math.ceil(n_answers / batch) * new_tokens
    flops = 2 * w.params() * n_answers * (prompt + new_tokens)
    device = weights + max(held + decode, applying)
    cpu = RUNTIME_BYTES + resident_weights(w, dtype, w.n_layers, True, mapped) + on_host
    cpu += max(held + decode + head_copy(w, dtype), applying)
    return JobCost(device, RUNTIME_BYTES + max(weights, on_host), cpu, flops, weights * steps)


def locality_cost(
    w: Widths, dtype: str, batch: int, seq: int, n_models: int, n_tokens: int, mapped: bool = True
) -> JobCost:
    """lm-eval log-likelihoods: a batch of `seq`-token requests with fp32 logits at every position."""
    b = DTYPE_BYTES[dtype]
    weights = w.params() * b
    act = batch * seq * (w.vocab * FP32 * 2 + w.token_activations(b))
    flops = 2 * w.params() * n_tokens * n_models
    cpu = RUNTIME_BYTES + resident_weights(w, dtype, w.n_layers, True, mapped) + act
    return JobCost(weights + act, RUNTIME_BYTES + weights, cpu, flops, weights * n_models)


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


@dataclass(frozen=True)
class Lengths:
    """Token counts of a run's requests that its peaks depend on: the δ loop's prompt and answer (the
    target with its end-of-turn token) and a generate prompt."""

    prompt: int = 64
    answer: int = 300
    question: int = 64


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def request_lengths(plan, run) -> Lengths | None:
    """The longest prompt, answer and generate prompt among a run's requests, tokenized as its stages
    tokenize them (muke.engine.windows.encode; render_prompt of each question kind) by the prepared
    model's tokenizer; None where the model is not prepared, or its tokenizer or a request cannot be
    read or encoded (the plan's assumed lengths then stand)."""
    from muke.workflow.stages.common import MODEL_REF, model_path

    folder = Path(plan.model_dir(run.model))
    if not (folder / MODEL_REF).is_file():
        return None
    try:
        return _lengths(_tokenizer(model_path(folder)), run)
    except (OSError, ValueError):
        return None


def _lengths(tok, run) -> Lengths | None:
    from muke.data import load_requests_checked, select
    from muke.engine.windows import encode, render_prompt

    d = run.dataset
    requests, _ = load_requests_checked(d.path, d.format, d.on_bad_record)
    chosen = select(requests, ids=d.ids, offset=d.offset, limit=d.limit)
    if not chosen:
        return None
    gen = run.generate.params["generation"]
    questions = [
        q
        for r in chosen
        for kind, qs in (
            ("question", [r.question]),
            ("para_question", [r.para_question] if r.para_question else []),
            ("sub_questions", list(r.sub_questions)),
        )
        if kind in gen["kinds"]
        for q in qs
    ]
    prompts = [render_prompt(tok, q, gen.get("system_prompt"), gen.get("chat_template", True)) for q in questions]
    question = max((len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts), default=64)
    if run.memories is None:
        return Lengths(question=question)
    mem = run.memories.params["memory"]
    seqs = [
        encode(tok, r.question, r.answer, tok.eos_token, mem["window"], mem["system_prompt"], mem["chat_template"])
        for r in chosen
    ]
    return Lengths(max(len(s.prompt_ids) for s in seqs), max(len(s.target_ids) for s in seqs), question)


def _job_costs(plan, lengths_of, doc_tokens: int):
    """Each stage spec of a plan as (model, stage, spec, cost, jobs): the peaks of one job, the work
    (FLOPs, traffic) of all `jobs` (its shards). lengths_of(run): the run's `Lengths`."""
    seen_stats = set()
    for run in plan.runs:
        m = run.model
        w, dtype = widths_of(m, plan.model_dir(m)), m.dtype
        mapped = w.stored_dtype in (None, dtype)
        n_req, shards = len(run.dataset.request_ids), run.dataset.n_shards
        n = lengths_of(run)
        gen = run.generate.params["generation"]
        answers = n_req * len(gen["kinds"]) * 2
        cost = generate_cost(
            w, dtype, gen["batch_size"], n.question, gen["max_new_tokens"], answers, _edit(run, gen), mapped
        )
        yield m.name, "generate", run.generate, cost, shards
        if run.stats is not None and run.stats.identity not in seen_stats:
            seen_stats.add(run.stats.identity)
            p = run.stats.params
            length = min(p["max_length"] or w.context, doc_tokens)
            n_docs = p["max_docs"] or 100_000
            cost = collect_stats_cost(w, dtype, p["layers"], p["batch_tokens"], n_docs * length, mapped)
            yield m.name, "collect_stats", run.stats, cost, 1
        if run.memories is None:
            continue
        mem = run.memories.params["memory"]
        window = (mem["window"] or n.answer) if mem["objective"] != "one_for_all" else n.answer
        # the LM head on a slice of positions (`head_copy`): the affinity pass, or every pass of the plain path
        sliced = not mem.get("fast", True) or (mem["objective"] == "matryoshka" and mem["affinity_steps"] > 0)
        cost = memories_cost(
            w, dtype, mem["layer"], n.prompt, n.answer, window, mem["v_num_grad_steps"], sliced, mapped
        )
        cost.flops, cost.traffic = cost.flops * n_req, cost.traffic * n_req
        yield m.name, "optimize_memories", run.memories, cost, shards
        u = run.update.params
        layers, batch = u["options"]["layers"], u["edit_batch_size"]
        steps = u["options"].get("steps", 0)
        preserve = u["options"].get("n_preserve", 0)
        delta = u["options"].get("delta_dtype", "float32")
        n_keys = (n.prompt + n.answer) * batch
        cost = update_cost(w, dtype, u["backend"], layers, n_keys, steps, preserve, delta, mapped)
        cost.flops *= math.ceil(n_req / batch)
        yield m.name, "update_weights", run.update, cost, shards
        if run.locality is not None:
            yield m.name, "locality", run.locality, _locality(w, dtype, run.locality.params, mapped), 1
    for name, spec in plan.pre_edit_locality.items():
        m = plan.models[name]
        w = widths_of(m, plan.model_dir(m))
        yield name, "locality", spec, _locality(w, m.dtype, spec.params, w.stored_dtype in (None, m.dtype)), 1


def _edit(run, gen: dict) -> Edit | None:
    """What a generate batch of the run holds of its edits: the update's kind and layers, and how many
    edits share a batch (generate.generation_groups: an edit's answers, at least one per question kind
    and request, fill gen batch_size rows)."""
    if run.update is None:
        return None
    u = run.update.params
    layers, size = u["options"]["layers"], u["edit_batch_size"]
    edits = max(1, min(gen["batch_size"] // (len(gen["kinds"]) * size), math.ceil(run.dataset.shard_size / size)))
    if u["backend"] == "unke":
        return Edit(dense_blocks=len(layers), delta_dtype=u["options"].get("delta_dtype", "float32"), updates=edits)
    return Edit(low_rank_layers=len(layers), updates=edits)


def _locality(w: Widths, dtype: str, loc: dict, mapped: bool = True) -> JobCost:
    """A locality job: lm-eval of each model it checks, one per edit (the pre-edit job: the unedited model)."""
    tokens = 2_000_000 if loc["limit"] is None else int(loc["limit"] * 1000 * len(loc["tasks"]))
    return locality_cost(w, dtype, _batch(loc), 1024, len(loc["edits"]) or 1, tokens, mapped)


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
    assumed = Lengths(answer=answer_tokens)
    for model, stage, _, cost, jobs in _job_costs(plan, lambda run: assumed, doc_tokens):
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


def job_memory(plan, answer_tokens: int = 300, doc_tokens: int = 700, from_requests: bool = True) -> list[dict]:
    """Per job of a plan (a stage's shards share one entry): its rule, model and identity (which its
    Snakemake benchmark file's path names) and its peak memory in bytes: host_bytes and device_bytes
    run with a GPU, cpu_bytes run on the CPU alone. With from_requests (the report and the rehearsal
    compare the figures with the jobs that ran) each run's requests give its lengths (`request_lengths`)
    where its model is prepared; else, and without, answers of answer_tokens as in the plan."""
    assumed = Lengths(answer=answer_tokens)

    def lengths_of(run):
        return (request_lengths(plan, run) if from_requests else None) or assumed

    out = {}
    for model, stage, spec, cost, _ in _job_costs(plan, lengths_of, doc_tokens):
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
