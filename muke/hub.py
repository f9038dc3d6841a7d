"""What muke's jobs fetch from the Hugging Face hub, and the error an offline node gives without it.

Compute nodes are often offline: `muke prefetch` fetches a config's models, statistics corpora and
lm-eval datasets on a host with network access, into the caches the jobs read (HF_HOME for the hub's
files and datasets, $MUKE_CACHE for muke's own); the jobs then run with HF_HUB_OFFLINE=1, and what is
missing fails with `OfflineMissing`, naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# the files of a checkpoint that loading it needs (Python files only where its remote code is trusted)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


class OfflineMissing(OSError):
    """Something a job needs is not in the local caches, and offline mode forbids fetching it."""


def offline() -> bool:
    """Whether the environment forbids the hub (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_VARIABLES)


def cache_description() -> str:
    home = os.environ.get("HF_HOME", "~/.cache/huggingface (HF_HOME unset)")
    return f"HF_HOME={home}, MUKE_CACHE={os.environ.get('MUKE_CACHE', '~/.cache/muke (unset)')}"


@contextmanager
def missing_offline(what: str, errors: tuple = (OSError, ValueError)) -> Iterator[None]:
    """Inside the block, a failed load (`errors`) while offline becomes an OfflineMissing that names
    `what`, the caches searched and the fix (the hub's and datasets' cache misses are OSErrors or
    ValueErrors: LocalEntryNotFoundError, OfflineModeIsEnabled, DatasetNotFoundError). Online, errors
    pass unchanged."""
    try:
        yield
    except errors as e:
        if isinstance(e, OfflineMissing) or not offline():
            raise
        raise OfflineMissing(
            f"{what} is not in the local caches ({cache_description()}) and offline mode "
            f"({', '.join(v for v in OFFLINE_VARIABLES if v in os.environ)}) forbids fetching it: run "
            "`muke prefetch --configfile <this config>` on a host with network access, with the same "
            f"HF_HOME and MUKE_CACHE, then rerun. ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def model_snapshot(source: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """The local folder of a hub model's files (downloaded into the hub cache unless there already)."""
    from huggingface_hub import snapshot_download

    patterns = MODEL_FILES + (["*.py"] if trust_remote_code else [])
    at = f" at revision {revision}" if revision else ""
    with missing_offline(f"model {source}{at}"):
        return snapshot_download(source, revision=revision, allow_patterns=patterns)
