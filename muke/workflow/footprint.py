"""Each job's peak memory and work (muke estimate): one cost function per stage, from the model's widths
(muke.workflow.widths) and the job's sizes.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from muke.workflow.widths import Widths

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
RUNTIME_BYTES = int(0.45 * GiB)  # python + torch + transformers + muke imported: 444 MiB on CPU (test_estimate)


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


@dataclass(frozen=True)
class UpdateJob:
    """update_weights of one edit batch: n_keys edit positions (keys "sequence" read every position), and
    UnKE's optimiser steps, preservation samples and parameter-difference dtype."""

    w: Widths
    dtype: str
    layers: list[int]
    n_keys: int
    steps: int = 0
    preserve: int = 0
    delta_dtype: str = "float32"
    mapped: bool = True
    template: int = 0  # template prompts of C_t (template_weight > 0, muke.update.template_keys); 0: none

    def weights(self) -> int:
        return self.w.params() * DTYPE_BYTES[self.dtype]

    def read(self) -> int:
        """Weights a CPU job reads: keys are read by forward passes that stop at l_WM = max(layers)
        (muke.update.keys.read_layer, unke.record_block), so only blocks 0..l_WM."""
        return resident_weights(self.w, self.dtype, max(self.layers) + 1, False, self.mapped)

    def forward(self) -> int:
        """FLOPs of reading the keys, once per layer."""
        return 2 * self.w.params(max(self.layers) + 1) * self.n_keys * len(self.layers)


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
    template: int = 0,
) -> JobCost:
    """update_weights of one edit batch by `backend` (UPDATE_COSTS). Every backend first clones the
    parameters it edits (muke.update.keys.preserved) to restore them on exit; `template`: see UpdateJob."""
    job = UpdateJob(w, dtype, layers, n_keys, steps, preserve, delta_dtype, mapped, template)
    return UPDATE_COSTS[backend](job)


def _solve_cost(job: UpdateJob, solve: int, kept: int, flops: float) -> JobCost:
    """A MEMIT-family update (muke.update.memit.low_rank_update): the down-projections' originals, and per
    layer a solve holding `solve` d_ff² fp32 matrices besides the statistics of every layer, which are read
    through the file's memory map and stay resident once read (on the CPU all of them by the last layer);
    `kept` d_ff² more per earlier layer stay (AlphaEdit's P); `flops` · d_ff³ per layer."""
    w, L = job.w, len(job.layers)
    d2 = w.d_ff**2 * FP32
    originals = L * w.hidden * w.d_ff * DTYPE_BYTES[job.dtype]
    t = 1 if job.template else 0  # C_t (template_keys): its L sums, then kept on the host, streamed per layer
    device = job.weights() + originals + max(solve + t, t * L) * d2
    host = RUNTIME_BYTES + max(job.weights(), (1 + kept + t) * L * d2)
    cpu = RUNTIME_BYTES + job.read() + originals + ((1 + t) * L + kept * (L - 1) + solve + t) * d2
    return JobCost(device, host, cpu, job.forward() + L * flops * w.d_ff**3 + template_flops(job))


def template_flops(job: UpdateJob) -> float:
    """C_t's pass (muke.update.template_keys.template_sums): `template` prompts of ~TEMPLATE_TOKENS tokens up to
    l_WM, and Σ k kᵀ (half, add_gram) over ~TEMPLATE_POSITIONS template positions each, per layer."""
    tokens, keys = job.template * TEMPLATE_TOKENS, job.template * TEMPLATE_POSITIONS
    return 2 * job.w.params(max(job.layers) + 1) * tokens + len(job.layers) * keys * job.w.d_ff**2


TEMPLATE_TOKENS, TEMPLATE_POSITIONS = 40, 6  # a template prompt (demo corpus sentence + ChatML) and its tail


def memit_cost(job: UpdateJob) -> JobCost:
    """MEMIT (memit.memit_solve, per layer): C streamed from the statistics, M = w·C + K Kᵀ and
    torch.linalg.solve's LU copy of M, three d_ff²; LU ~ (2/3) d_ff³."""
    return _solve_cost(job, solve=3, kept=0, flops=2 / 3)


def alphaedit_cost(job: UpdateJob) -> JobCost:
    """AlphaEdit: computing P (alphaedit.null_space_projector) holds C, eigh's eigenvectors and its LAPACK
    workspace of 2·d_ff² (syevd, measured), four d_ff²; the P of every earlier layer is kept (stats.cache),
    so the CPU's peak is the last layer's: L statistics + (L - 1) P + 4. eigh ~ 9 d_ff³, P = U0 U0ᵀ, LU."""
    return _solve_cost(job, solve=4, kept=1, flops=10)


def unke_cost(job: UpdateJob) -> JobCost:
    """UnKE (unke.fit_block, one layer at a time): the edited blocks' originals, an fp32 copy of the block,
    its gradients and AdamW's two moments, plus the larger of a step's activations (edit and preservation
    sequences, forward and backward) and the optimiser's temporaries: on the CPU (single-tensor AdamW)
    exp_avg_sq.sqrt() and the quotient of the parameter being updated while the previous parameter's
    denominator is still bound, three of the largest parameter (measured); on a GPU (foreach AdamW) one
    sqrt per parameter, a block. The parameter differences of the earlier layers are kept, on the host
    (delta_dtype)."""
    w, L = job.w, len(job.layers)
    block, delta = w.block_params(), DTYPE_BYTES[job.delta_dtype]
    fit = 4 * block * FP32
    tokens = job.n_keys + job.preserve * 512  # preservation samples are truncated at 512 tokens (unke_update)
    act = tokens * w.token_activations(FP32) * 2
    largest = w.hidden * w.d_ff * FP32
    kept = L * block * DTYPE_BYTES[job.dtype]  # the edited blocks' originals
    earlier = (L - 1) * block * delta
    flops = job.forward() + 6 * block * tokens * job.steps * L
    device = job.weights() + kept + fit + max(act, block * FP32)
    host = RUNTIME_BYTES + max(job.weights(), L * block * delta)
    cpu = RUNTIME_BYTES + job.read() + kept + earlier + fit + max(act, 3 * largest)
    return JobCost(device, host, cpu, flops)


def _finetune_cost(job: UpdateJob, trained: int, steps: int) -> JobCost:
    """A fine-tuning baseline (muke.update.finetune.train): `trained` fp32 numbers held four times (ft: the
    originals, the fp32 copies, their gradients; Adam's two moments; lora: the adapters' likewise), and a
    step's forward and backward over the whole model, one request at a time: every block's activations of
    the request's tokens and its target logits (`logit_bytes`), `steps` steps (ft_steps / lora_steps)."""
    w, b = job.w, DTYPE_BYTES[job.dtype]
    kept = 5 * trained * FP32
    act = job.n_keys * (w.n_layers * w.token_activations(b) + w.vocab * logit_bytes(job.dtype))
    cpu = RUNTIME_BYTES + resident_weights(w, job.dtype, w.n_layers, True, job.mapped) + kept + act
    return JobCost(job.weights() + kept + act, RUNTIME_BYTES + job.weights(), cpu, 6 * w.params() * job.n_keys * steps)


def ft_cost(job: UpdateJob) -> JobCost:
    """ft: the down-projections of the edited layers; 25 steps where ft_steps is not set (its default)."""
    return _finetune_cost(job, len(job.layers) * job.w.hidden * job.w.d_ff, job.steps or 25)


def lora_cost(job: UpdateJob) -> JobCost:
    """lora: rank-8 adapters on two hidden × hidden projections of each edited layer (the defaults; their
    size is small beside the activations); 70 steps where lora_steps is not set (its default)."""
    return _finetune_cost(job, len(job.layers) * 2 * 2 * 8 * job.w.hidden, job.steps or 70)


# the estimate of each backend's update job (muke.update.backends.BACKENDS); kept here, not in the registry,
# so that recalibrating a formula does not move the update stages' code identity (muke.workflow.identity)
UPDATE_COSTS = {"memit": memit_cost, "alphaedit": alphaedit_cost, "unke": unke_cost, "ft": ft_cost, "lora": lora_cost}


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
