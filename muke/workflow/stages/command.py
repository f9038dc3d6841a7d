"""`muke stage <name> ...`: each stage function is its own subcommand, its parameters the options.

A stage declares its arguments once, in its signature; `@command` reads it: a parameter without a
default is a required option, `int` parameters parse as integers, `list[...]` parameters take several
values, `spec` is the job's JSON spec (or @FILE holding it), and a stage with a `device` also gets
`--threads` (torch CPU threads). Option names are the parameter names with dashes.
"""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path

COMMANDS: list[tuple] = []  # (stage function, help, {parameter: help}), as the stage modules load
COMMON_HELP = {
    "spec": "the job's JSON spec (muke.workflow.identity.Spec), or @FILE holding it",
    "model": "prepared model folder (prepare-model)",
    "out": "output file",
    "device": "auto (cuda if present), cpu, cuda, cuda:1, ...",
}


def spec_arg(text: str) -> dict:
    """--spec: a JSON object, or @FILE holding one."""
    return json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)


def command(help: str, **arg_help: str):
    """Register a stage function as `muke stage <its name, dashed>`; `arg_help`: help of its options."""

    def register(fn):
        COMMANDS.append((fn, help, arg_help))
        return fn

    return register


def _add_argument(parser, param: inspect.Parameter, hint, help: str | None) -> None:
    flag = "--" + param.name.replace("_", "-")
    required = param.default is inspect.Parameter.empty
    kwargs = {"required": True} if required else {"default": param.default}
    if param.name == "spec":
        kwargs["type"] = spec_arg
    elif typing.get_origin(hint) is list:
        kwargs["nargs"] = "+" if required else "*"
    elif hint is int or hint == (int | None):
        kwargs["type"] = int
    parser.add_argument(flag, help=help, **kwargs)


def _add_parser(sub, fn, help: str, arg_help: dict) -> None:
    parser = sub.add_parser(fn.__name__.replace("_", "-"), help=help, description=inspect.getdoc(fn))
    hints = typing.get_type_hints(fn)
    params = inspect.signature(fn).parameters
    for param in params.values():
        _add_argument(parser, param, hints.get(param.name), arg_help.get(param.name, COMMON_HELP.get(param.name)))
    if "device" in params:
        parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(stage_function=fn)


def _run(args) -> None:
    fn = args.stage_function
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    fn(**{name: getattr(args, name) for name in inspect.signature(fn).parameters})


def add_commands(subparsers) -> None:
    """`muke stage <name>` for every registered stage function (muke.cli imports the stage modules first)."""
    parser = subparsers.add_parser("stage", help="run one workflow stage (called by the Snakemake rules)")
    sub = parser.add_subparsers(dest="stage", required=True)
    for fn, help, arg_help in COMMANDS:
        _add_parser(sub, fn, help, arg_help)
    parser.set_defaults(func=_run)
