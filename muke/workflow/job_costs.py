"""The cost of every job of a workflow plan (muke estimate, the report's memory figures): the cost
functions of muke.workflow.footprint applied to each run's stage specs, summed per stage
(`estimate_plan`, `format_table`: muke estimate's table).

The token lengths come from the run's requests where the model is prepared (`job_memory`, which the
report and benchmarks/rehearsal.py compare with measured peaks); muke estimate assumes them (`Lengths`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from muke.update.backends import BACKENDS
from muke.update.template_keys import TEMPLATE_PROMPTS
from muke.workflow.footprint import (
    DTYPE_BYTES,
    Edit,
    GiB,
    JobCost,
    collect_stats_cost,
    generate_cost,
    locality_cost,
    memories_cost,
    update_cost,
)
from muke.workflow.widths import Widths, widths_of


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
    encoding = run.memories or (run.update if run.update and "memory" in run.update.params else None)
    if encoding is None:
        return Lengths(question=question)
    mem = encoding.params["memory"]
    seqs = [
        encode(tok, r.question, r.answer, tok.eos_token, mem.get("window"), mem["system_prompt"], mem["chat_template"])
        for r in chosen
    ]
    return Lengths(max(len(s.prompt_ids) for s in seqs), max(len(s.target_ids) for s in seqs), question)


def job_costs(plan, lengths_of, doc_tokens: int):
    """Each stage spec of a plan as (model, stage, spec, cost, jobs): the peaks of one job, the work
    (FLOPs, traffic) of all `jobs` (its shards). lengths_of(run): the run's `Lengths`."""
    seen_stats = set()
    for run in plan.runs:
        m = run.model
        w = widths_of(m, plan.model_dir(m))
        n, mapped = lengths_of(run), w.stored_dtype in (None, m.dtype)
        yield m.name, "generate", run.generate, _generate(w, m.dtype, run, n, mapped), run.dataset.n_shards
        if run.stats is not None and run.stats.identity not in seen_stats:
            seen_stats.add(run.stats.identity)
            yield m.name, "collect_stats", run.stats, _stats(w, m.dtype, run.stats.params, doc_tokens, mapped), 1
        if run.memories is not None:
            memories = _memories(w, m.dtype, run, n, mapped)
            yield m.name, "optimize_memories", run.memories, memories, run.dataset.n_shards
        if run.update is not None:  # a run with no target memories (ft, lora) still has its update
            yield m.name, "update_weights", run.update, _update(w, m.dtype, run, n, mapped), run.dataset.n_shards
        if run.locality is not None:
            yield m.name, "locality", run.locality, _locality(w, m.dtype, run.locality.params, mapped), 1
    for name, spec in plan.pre_edit_locality.items():
        m = plan.models[name]
        w = widths_of(m, plan.model_dir(m))
        yield name, "locality", spec, _locality(w, m.dtype, spec.params, w.stored_dtype in (None, m.dtype)), 1


def _generate(w: Widths, dtype: str, run, n: Lengths, mapped: bool) -> JobCost:
    """A generate shard: every question kind of every request answered before and after its edit."""
    gen = run.generate.params["generation"]
    answers = len(run.dataset.request_ids) * len(gen["kinds"]) * 2
    return generate_cost(
        w, dtype, gen["batch_size"], n.question, gen["max_new_tokens"], answers, _edit(run, gen), mapped
    )


def _stats(w: Widths, dtype: str, p: dict, doc_tokens: int, mapped: bool) -> JobCost:
    """collect_stats over max_docs documents (100 000 unless set) of doc_tokens, truncated at max_length."""
    length = min(p["max_length"] or w.context, doc_tokens)
    n_docs = p["max_docs"] or 100_000
    return collect_stats_cost(w, dtype, p["layers"], p["batch_tokens"], n_docs * length, mapped)


def _memories(w: Widths, dtype: str, run, n: Lengths, mapped: bool) -> JobCost:
    """The δ loops of a shard: the peak of one request, the work of all the run's requests."""
    mem, n_req = run.memories.params["memory"], len(run.dataset.request_ids)
    window = (mem["window"] or n.answer) if mem["objective"] != "one_for_all" else n.answer
    # the LM head on a slice of positions (`head_copy`): the affinity pass, or every pass of the plain path
    sliced = not mem.get("fast", True) or (mem["objective"] == "matryoshka" and mem["affinity_steps"] > 0)
    cost = memories_cost(w, dtype, mem["layer"], n.prompt, n.answer, window, mem["v_num_grad_steps"], sliced, mapped)
    cost.flops, cost.traffic = cost.flops * n_req, cost.traffic * n_req
    return cost


def _update(w: Widths, dtype: str, run, n: Lengths, mapped: bool) -> JobCost:
    """update_weights: the peak of one edit batch, the work of all the run's batches (with edit_passes, of
    all its passes)."""
    u = run.update.params
    options, batch = u["options"], u["edit_batch_size"]
    n_keys = (n.prompt + n.answer) * batch
    steps, preserve = options.get("steps", 0), options.get("n_preserve", 0)
    delta = options.get("delta_dtype", "float32")
    template = options.get("template_prompts", TEMPLATE_PROMPTS) if options.get("template_weight") else 0
    cost = update_cost(w, dtype, u["backend"], options["layers"], n_keys, steps, preserve, delta, mapped, template)
    cost.flops *= math.ceil(len(run.dataset.request_ids) / batch)
    passes = options.get("edit_passes", 1)
    if passes == 1:
        return cost
    # each further pass (muke.update.edit.further_passes): the δ loops again, at most to their cap, and an update
    again = _memories(w, dtype, run, n, mapped)
    return JobCost(
        max(cost.device, again.device),
        max(cost.host, again.host),
        max(cost.cpu, again.cpu),
        passes * cost.flops + (passes - 1) * again.flops,
        cost.traffic + (passes - 1) * again.traffic,
    )


def _edit(run, gen: dict) -> Edit | None:
    """What a generate batch of the run holds of its edits: the update's kind and layers, and how many
    edits share a batch (generate.generation_groups: an edit's answers, at least one per question kind
    and request, fill gen batch_size rows)."""
    if run.update is None:
        return None
    u = run.update.params
    layers, size = u["options"]["layers"], u["edit_batch_size"]
    edits = max(1, min(gen["batch_size"] // (len(gen["kinds"]) * size), math.ceil(run.dataset.shard_size / size)))
    if not BACKENDS[u["backend"]].factored:
        return Edit(dense_blocks=len(layers), delta_dtype=u["options"].get("delta_dtype", "float32"), updates=edits)
    return Edit(low_rank_layers=len(layers), updates=edits)


def _locality(w: Widths, dtype: str, loc: dict, mapped: bool = True) -> JobCost:
    """A locality job: lm-eval of each model it checks, one per edit (the pre-edit job: the unedited model)."""
    tokens = 2_000_000 if loc["limit"] is None else int(loc["limit"] * 1000 * len(loc["tasks"]))
    batch = loc["batch_size"] if isinstance(loc["batch_size"], int) else 8
    return locality_cost(w, dtype, batch, 1024, len(loc["edits"]) or 1, tokens, mapped)


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
    for model, stage, spec, cost, _ in job_costs(plan, lengths_of, doc_tokens):
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
    for model, stage, _, cost, jobs in job_costs(plan, lambda run: assumed, doc_tokens):
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
