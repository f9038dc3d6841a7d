"""`muke edit`: edit requests into a model and compare greedy answers and target NLL before and after."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muke.cli.common import load_model, model_options
from muke.cli.hparams import hparam_flags, preset_hparams
from muke.cli.rows import answers, describe, questions, safe_name, write_results
from muke.cli.sequential import edit_sequential
from muke.data import DEMO_CORPUS


@dataclass
class EditRun:
    """What both modes of `muke edit` share: the options, the model, the requests, the resolved preset,
    the statistics, and the chat settings (system_prompt, chat_template) of every prompt, answered or scored."""

    args: argparse.Namespace
    em: Any
    requests: list
    preset_path: str | None
    preset: dict
    stats: Any
    chat: dict

    @property
    def out(self) -> Path | None:
        return Path(self.args.out) if self.args.out else None

    def generate(self, requests) -> list:
        """Greedy answers to each request's question (and paraphrase)."""
        from muke.eval.generate import greedy

        prompts = [q for r in requests for q in questions(r)]
        return greedy(self.em, prompts, max_new_tokens=self.args.max_new_tokens, **self.chat)

    def sequence(self, r):
        """Request r's question and answer as the model sees them, for its target NLL."""
        from muke.engine.windows import encode

        return encode(self.em.tokenizer, r.question, r.answer, self.em.end_of_turn, None, **self.chat)

    def row(self, r) -> dict:
        return {
            "id": r.id,
            "method": self.args.method,
            "preset": self.preset_path,
            "question": r.question,
            "target": r.answer,
        }

    def emit(self, row: dict) -> dict:
        print(json.dumps(row, ensure_ascii=False) if self.args.json else describe(row), flush=True)
        return row


def _requests(args):
    from muke.data import EditRequest, load_requests

    if args.requests:
        if args.question or args.answer:
            raise ValueError("give either --requests or --question/--answer, not both")
        requests = load_requests(args.requests, args.format)
        return requests[: args.limit] if args.limit else requests
    if not (args.question and args.answer):
        raise ValueError("edit needs --question and --answer, or --requests FILE --format NAME")
    return [EditRequest("cli-0", args.question, args.answer, para_question=args.para_question)]


def _stats_for(em, backend: str, options: dict, args):
    """Statistics for the MEMIT-family layers: --stats FILE, else collected once on the demo corpus."""
    from muke.update.backends import BACKENDS
    from muke.update.stats import StatsConfig, cached_stats, load_stats

    if not BACKENDS[backend].stats:
        return None
    if args.stats:
        return load_stats(args.stats, em, options["layers"])
    print(f"muke: statistics for layers {options['layers']} from {DEMO_CORPUS.name} (cached)", file=sys.stderr)
    return cached_stats(
        em, StatsConfig(layers=tuple(options["layers"]), corpus=str(DEMO_CORPUS)), progress=not args.quiet
    )


def _check_requests(em, requests, memory: dict, path) -> None:
    """Every request must fit the model (templating, context length): one error listing all that do not."""
    from muke.data import model_problems

    context = em.context_length or float("inf")
    problems = model_problems(
        requests, em.tokenizer, context, path, memory.get("system_prompt"), memory.get("chat_template", True)
    )
    if problems:
        raise ValueError("; ".join(map(str, problems)))


def cmd_edit(args) -> None:
    from muke.update.methods import resolve_method

    em = load_model(args)
    requests = _requests(args)
    preset_path, preset = preset_hparams(args)
    memory, backend, options = resolve_method(args.method, preset)
    for layer in [memory["layer"], *options["layers"]]:
        em.check_layer(layer)
    _check_requests(em, requests, memory, args.requests or "--question")
    stats = _stats_for(em, backend, options, args)
    chat = {"system_prompt": memory.get("system_prompt"), "chat_template": memory.get("chat_template", True)}
    run = EditRun(args, em, requests, preset_path, preset, stats, chat)
    rows = edit_sequential(run) if args.sequential else _edit_single(run, memory)
    if run.out:
        write_results(run.out, rows)


def _edit_single(run: EditRun, memory: dict) -> list[dict]:
    """Each --batch-size batch edited alone into the unedited model: answers and target NLL before and after."""
    from muke.engine.memory import MemoryConfig
    from muke.update.edit import edit, optimise_memories, target_nll
    from muke.update.weights import apply

    args, em, requests, size = run.args, run.em, run.requests, run.args.batch_size
    pre = iter(run.generate(requests))
    memories = optimise_memories(em, requests, MemoryConfig(**memory), args.delta_batch_size)
    rows = []
    for start in range(0, len(requests), size):
        batch = requests[start : start + size]
        begin = time.perf_counter()
        update, found = edit(em, batch, args.method, run.preset, run.stats, memories[start : start + size])
        seconds = (time.perf_counter() - begin) / len(batch) + sum(r.seconds for r in found) / len(batch)
        if run.out:
            update.save(run.out / "updates" / f"{safe_name(batch[0].id)}.safetensors")
        seqs = [run.sequence(r) for r in batch]
        nll_pre = [target_nll(em, s) for s in seqs]
        with apply(em, update):
            post = iter(run.generate(batch))
            nll_post = [target_nll(em, s) for s in seqs]
        for r, before, after in zip(batch, nll_pre, nll_post):
            row = run.row(r)
            row.update(answers(r, next(pre), next(post)), nll_pre=before, nll_post=after, seconds=seconds)
            if r.para_question:
                row.update(answers(r, next(pre), next(post), "para_"), para_question=r.para_question)
            rows.append(run.emit(row))
    return rows


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or an integer ≥ 1, got {value!r}")
    return int(value)


def add_parsers(sub) -> None:
    p = sub.add_parser("edit", help="edit requests into a model and compare greedy answers before/after")
    model_options(p)
    p.add_argument(
        "--method",
        required=True,
        help="muke-memit, muke-unke, anyedit-memit, anyedit-unke, memit, alphaedit, unke, or OBJECTIVE+BACKEND",
    )
    p.add_argument("--question")
    p.add_argument("--answer")
    p.add_argument("--para-question")
    p.add_argument("--requests", help="file of edit requests")
    p.add_argument("--format", default="jsonl")
    p.add_argument("--limit", type=int, default=None, help="edit only the first N requests")
    p.add_argument("--batch-size", type=int, default=1, help="requests per weight update")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="edit the batches one after another into the same model; report each request right after its "
        "batch and after the last",
    )
    p.add_argument(
        "--delta-batch-size",
        type=_batch_size,
        default="auto",
        help="requests whose δ loops share each step's passes (each its own Adam state and early stop); "
        "auto (default): as many as fit half the device's free memory",
    )
    p.add_argument("--stats", help="statistics file (default: computed on the demo corpus and cached)")
    p.add_argument(
        "--preset",
        help="a model preset (name in config/models/ or .yaml path; default: the shipped "
        "preset of --model, if any) or a YAML mapping of hyperparameters",
    )
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--out", help="folder for the weight updates ΔW and results.jsonl")
    p.add_argument("--json", action="store_true", help="one JSON object per request")
    p.add_argument("--quiet", action="store_true")
    hparam_flags(p)
    p.set_defaults(func=cmd_edit)
