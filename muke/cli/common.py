"""Options and helpers that several `muke` commands share: the model to load, its trust flag."""

from __future__ import annotations


def trust_option(p) -> None:
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run Python code shipped with the model (off by default)"
    )


def model_options(p) -> None:
    p.add_argument("--model", required=True, help="local folder or hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    trust_option(p)


def load_model(args):
    """The EditableModel of --model, --dtype, --device, --trust-remote-code."""
    from muke.model import load

    return load(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
