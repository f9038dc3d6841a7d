"""`muke edit`: edit requests into a model and compare greedy answers and target NLL before and after."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from muke.cli.common import load_model, model_options
from muke.cli.hparams import hparam_flags, preset_hparams
from muke.cli.rows import describe, write_results
from muke.data import DEMO_CORPUS


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
    """Statistics for the MEMIT-family layers: --stats FILE, else collected once on the demo corpus; with
    template_weight > 0 the template's second moment attached (muke.update.template_keys, cached)."""
    from muke.editor import statistics

    return statistics(em, backend, options, args.stats, DEMO_CORPUS, progress=not args.quiet)


def cmd_edit(args) -> None:
    """The requests edited through muke.Editor: each batch alone, or one after another (--sequential)."""
    from muke.editor import Editor

    em = load_model(args)
    requests = _requests(args)
    preset_path, preset = preset_hparams(args)
    editor = Editor(em, args.method, preset, max_new_tokens=args.max_new_tokens, delta_batch_size=args.delta_batch_size)
    editor.preset_name = preset_path
    editor.check(requests, args.requests or "--question")
    editor.stats = _stats_for(em, editor.backend, editor.options, args)
    out = Path(args.out) if args.out else None
    rows = (
        _edit_sequential(editor, requests, args, out) if args.sequential else _edit_single(editor, requests, args, out)
    )
    if out:
        write_results(out, rows)


def _emit(row: dict, args) -> dict:
    print(json.dumps(row, ensure_ascii=False) if args.json else describe(row), flush=True)
    return row


def _edit_single(editor, requests: list, args, out: Path | None) -> list[dict]:
    """Each --batch-size batch edited alone into the unedited model: answers and target NLL before and after."""
    from muke.result import safe_name

    rows = []
    for result in editor.edit_each(requests, args.batch_size):
        if out:
            result.update.save(out / "updates" / f"{safe_name(result.requests[0].id)}.safetensors")
        rows += [_emit(row, args) for row in result.rows]
    return rows


def _edit_sequential(editor, requests: list, args, out: Path | None) -> list[dict]:
    """The batches edited one after another (Editor.edit_sequence): every request's answers and target NLL
    right after its own batch (`own_*`, `nll_own`) and after the last (`generated`, `bleu`, `nll_post`, ...)."""
    from muke.result import safe_name

    def on_batch(t: int, update, seconds: float) -> None:
        if out:
            update.save(out / "updates" / f"{t:04d}-{safe_name(update.request_ids[0])}.safetensors")
        print(f"muke: batch {t + 1} ({update.request_ids}) edited in {seconds:.1f} s per request", file=sys.stderr)

    options = {
        "preserve_earlier": args.preserve_earlier,
        "weight_growth": args.weight_growth,
        "recheck_earlier": args.recheck_earlier,
    }
    result = editor.edit_sequence(
        requests, args.batch_size, on_batch=on_batch, resolve_every=args.resolve_every, **options
    )
    return [_emit(row, args) for row in result.rows]


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
        "--preserve-earlier",
        action="store_true",
        help="--sequential, memit: the earlier batches' edit keys join the preserved keys of the later solves",
    )
    p.add_argument(
        "--weight-growth",
        type=float,
        default=0.0,
        help="--sequential, memit: batch t solves with mom2_update_weight × (1 + g · edits made before it)",
    )
    p.add_argument(
        "--resolve-every",
        type=int,
        default=None,
        help="--sequential, memit / alphaedit: every k-th batch re-solves one update over all targets so far, "
        "on the original weights",
    )
    p.add_argument(
        "--recheck-earlier",
        action="store_true",
        help="--sequential, memit / alphaedit with edit_passes ≥ 2: each batch's passes also complete the earlier "
        "requests a later edit pushed below the stop probability",
    )
    p.add_argument(
        "--delta-batch-size",
        type=_batch_size,
        default="auto",
        help="requests whose δ loops share each step's passes (each its own Adam state and early stop); "
        "auto (default): as many as the preset's delta_memory_gib budget holds (never the memory free now); "
        "1 is the reference setting (docs/ALGORITHM.md §4)",
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
