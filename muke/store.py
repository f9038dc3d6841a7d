"""Entries shared by concurrent jobs (the statistics store `runtime.stats_store`, the user's cache): one
computation per entry, checksummed.

Two jobs that need one entry at once — two Snakemake runs, or SLURM jobs on two nodes — take the entry's
lock (NAME.lock, a `filelock` flock/fcntl lock: it works on NFS and is released when its holder dies, even
by kill -9). The first computes the entry, its checkpoint (NAME.partial) written by it alone, and records
its sha256 (NAME.sha256); the others wait, then find the entry and use it. An entry whose content is not
its recorded sha256 (a truncated or corrupted file) is computed again. NAME.owner says which job holds the
lock; the wait ends after MUKE_STORE_LOCK_TIMEOUT seconds (default 48 hours) with an error naming both.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from muke.io import ChecksumError, checksum_path, record_sha256, verify_sha256, write_json

TIMEOUT_ENV = "MUKE_STORE_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 48 * 3600.0


class StoreError(RuntimeError):
    """A store entry that could not be had: its lock is held too long, or it cannot be written."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def lock_timeout() -> float:
    """Seconds to wait for another job's entry: $MUKE_STORE_LOCK_TIMEOUT, else DEFAULT_TIMEOUT."""
    value = os.environ.get(TIMEOUT_ENV)
    try:
        return float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        raise StoreError(f"{TIMEOUT_ENV}={value!r}: not a number of seconds") from None


def _sibling(entry: Path, suffix: str) -> Path:
    return entry.with_name(entry.name + suffix)


def _owner(entry: Path) -> str:
    try:
        return json.loads(_sibling(entry, ".owner").read_text())["job"]
    except (OSError, ValueError, KeyError):
        return "another job"


@contextmanager
def entry_lock(entry: str | Path, timeout: float | None = None):
    """Hold the lock of a store entry; waits up to `timeout` seconds (lock_timeout()) for another holder."""
    from filelock import FileLock, Timeout

    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    timeout = lock_timeout() if timeout is None else timeout
    lock = FileLock(_sibling(entry, ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"{entry}: {_owner(entry)} is computing this entry; waiting for it (at most {timeout:g} s)")
        try:
            lock.acquire(timeout=timeout, poll_interval=1.0)
        except Timeout:
            raise StoreError(
                f"{entry}: waited {timeout:g} s for {_owner(entry)}, which holds {lock.lock_file}; if no job is "
                f"computing this entry, delete that file, or raise {TIMEOUT_ENV}"
            ) from None
    try:
        job = f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        write_json(_sibling(entry, ".owner"), {"job": job})
        yield
    finally:
        _sibling(entry, ".owner").unlink(missing_ok=True)
        lock.release()


def complete_safetensors(path: Path) -> bool:
    """Whether an entry written before checksums is a whole muke safetensors file: it reads back in full
    and its "muke" metadata says `complete`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            whole = all(f.get_tensor(k) is not None for k in f.keys())
            return whole and bool(json.loads((f.metadata() or {}).get("muke", "{}")).get("complete"))
    except Exception:  # any unreadable file: computed again
        return False


def _trusted(entry: Path, legacy: Callable[[Path], bool] | None) -> bool:
    """Whether the entry is there and whole: its recorded sha256 matches; an entry from before checksums
    is adopted (its sha256 recorded) where `legacy(entry)` accepts it."""
    if not entry.is_file():
        return False
    try:
        verify_sha256(entry, required=True)
        return True
    except ChecksumError as e:
        if not checksum_path(entry).is_file() and legacy is not None and legacy(entry):
            record_sha256(entry)
            return True
        log(f"{e}: computing the entry again")
    entry.unlink()
    return False


def ensure_entry(
    entry: str | Path,
    compute: Callable[[Path], object],
    *,
    legacy: Callable[[Path], bool] | None = None,
    timeout: float | None = None,
) -> bool:
    """Make sure a whole `entry` is there: found (and verified), or computed by `compute(entry)` under the
    entry's lock and its sha256 recorded. True where this call computed it."""
    entry = Path(entry)
    with entry_lock(entry, timeout):
        if _trusted(entry, legacy):
            return False
        checksum_path(entry).unlink(missing_ok=True)
        compute(entry)
        record_sha256(entry)
    return True
