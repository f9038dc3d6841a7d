"""`muke prefetch`: fetch what a config's jobs download, for nodes without network."""

from __future__ import annotations

from pathlib import Path


def cmd_prefetch(args) -> None:
    """Fetch what the config's jobs download (muke.workflow.prefetch), into --hf-home / --cache if given."""
    import os

    for variable, value in (("HF_HOME", args.hf_home), ("MUKE_CACHE", args.cache)):
        if value:  # before huggingface_hub / datasets are imported: they read it once
            os.environ[variable] = str(Path(value).resolve())
    from muke.workflow.config import load_yaml
    from muke.workflow.prefetch import prefetch

    for line in prefetch(load_yaml(args.configfile)):
        print(f"muke prefetch: {line}", flush=True)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "prefetch",
        help="fetch a config's models, statistics corpora, lm-eval datasets and NLTK data for offline nodes",
    )
    p.add_argument("--configfile", required=True, help="the workflow config the jobs will run")
    p.add_argument("--hf-home", help="HF_HOME to fill (default: $HF_HOME, else ~/.cache/huggingface)")
    p.add_argument("--cache", help="muke's cache to fill (default: $MUKE_CACHE, else ~/.cache/muke)")
    p.set_defaults(func=cmd_prefetch)
