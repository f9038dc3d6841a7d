"""`muke` command line: build models, collect statistics, edit and evaluate, export edited models.

Bad input (files, records, models, options) ends with one line on stderr and exit status 2;
`muke validate-data` lists every problem of a file and exits 1 when it finds any.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from muke.cli import data, edit, export, models, prefetch, stats, trace


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muke", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from muke.workflow.estimate import add_estimate_parser

    for group in (models, data, stats, edit, trace, export, prefetch):  # one module per command group
        group.add_parsers(sub)
    add_estimate_parser(sub)

    from muke.workflow.identity import STAGES
    from muke.workflow.stages.command import add_commands

    for stage in (*STAGES, "report"):  # importing a stage's module registers its subcommand
        importlib.import_module(f"muke.workflow.stages.{stage}")
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("muke: error: --batch-size must be ≥ 1", file=sys.stderr)
        return 2
    try:
        code = args.func(args)
    except (ValueError, OSError) as e:  # DataError, ModelError, StatsError are ValueErrors
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"muke: error: {message}", file=sys.stderr)
        return 2
    return code or 0
