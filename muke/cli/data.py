"""`muke validate-data`: every problem of an edit-requests file, and with --model, of its requests for that model."""

from __future__ import annotations

from muke.cli.common import trust_option
from muke.cli.hparams import memory_flags
from muke.data import FORMATS


def cmd_validate_data(args) -> int:
    """Every problem of an edit-requests file (and, with --model, of its requests for that model's
    tokenizer and context), one per line, then a count; exit 1 when there is any, else one summary line."""
    from muke.data import DataError, load_requests_checked

    try:
        requests, problems = load_requests_checked(args.file, args.format, on_bad_record="skip")
    except DataError as e:  # the file as a whole is unreadable
        requests, problems = [], [e]
    unfit, checked = set(), ""
    if args.model:
        for_model, checked = _model_problems(args, requests)
        problems, unfit = problems + for_model, {e.record for e in for_model}
    if not requests and not problems:
        problems.append(DataError(args.file, "holds no requests"))
    if problems:
        for problem in sorted(problems, key=lambda e: -1 if e.record is None else e.record):
            print(problem)
        print(f"{args.file}: {len(problems)} problem(s); {len(requests) - len(unfit)} usable request(s)")
        return 1
    print(f"{args.file}: {len(requests)} requests in format {args.format}, no problems{checked}")
    return 0


def _model_problems(args, requests) -> tuple[list, str]:
    """(the problems of the requests for --model's tokenizer and context, the summary's note on it)."""
    from transformers import AutoConfig, AutoTokenizer

    from muke.data import model_problems
    from muke.model import check_architecture, context_length

    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    check_architecture(config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    limit = context_length(config, tokenizer)
    chat_template = args.chat_template is not False
    problems = model_problems(requests, tokenizer, limit or float("inf"), args.file, args.system_prompt, chat_template)
    return problems, f", checked against {args.model} (context {limit} tokens)"


def add_parsers(sub) -> None:
    p = sub.add_parser("validate-data", help="check an edit-requests file (with --model: for that model too)")
    p.add_argument("file")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--model", help="local folder or hub id: also check templating and context length")
    memory_flags(p, {"system_prompt", "chat_template"})
    trust_option(p)
    p.set_defaults(func=cmd_validate_data)
