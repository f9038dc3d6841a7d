"""Files: atomic artifact writes (a temporary file beside the target, fsync, rename), content hashes,
recorded checksums and the user's cache folder.

A killed job leaves either the old file or none, never a half-written one that a rerun would trust. A file
that later stages or experiments trust without recomputing has its sha256 recorded beside it
(`record_sha256`: NAME.sha256, in `sha256sum` format) or in the index that lists it, and its readers
verify it (`verify_sha256`): a truncated or bit-flipped file is refused with an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteError(OSError):
    """A write that failed midway (disk full, quota, permission), naming the file it was to write."""


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path` (dropping the
    sha256 recorded for the old content, `record_sha256`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        checksum_path(path).unlink(missing_ok=True)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise WriteError(
            f"writing {path} failed ({e.strerror or e}): nothing new was left there; check the free space, "
            f"quota and permissions of {path.parent}"
        ) from e
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(df, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str]) -> Path:
    """Tensors (moved to the CPU, made contiguous) and string metadata as one safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as e:  # an I/O error of the writer (e.g. "File too large (os error 27)")
            raise OSError(str(e)) from e
    return Path(path)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """dst as a hard link to src (no second copy of a large file), or a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative path + content, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class ChecksumError(ValueError):
    """A file whose content is not what was written: truncated, corrupted, or missing its checksum."""


def checksum_path(path: str | Path) -> Path:
    """Where a file's recorded sha256 lies: NAME.sha256 beside it."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def record_sha256(path: str | Path, digest: str | None = None) -> str:
    """Record the sha256 of `path` (or `digest`, already known) in its checksum file; returns it."""
    digest = digest or sha256(path)
    write_text(checksum_path(path), f"{digest}  {Path(path).name}\n")
    return digest


def recorded_sha256(path: str | Path) -> str | None:
    """The sha256 recorded for `path`, or None where none was."""
    record = checksum_path(path)
    return record.read_text().split()[0] if record.is_file() and record.stat().st_size else None


def verify_sha256(
    path: str | Path, expected: str | None = None, required: bool = False, where: str = "its index"
) -> None:
    """Refuse `path` (ChecksumError naming it) where its sha256 is not `expected` (recorded in `where`), by
    default the one recorded beside it; a file with no recorded sha256 (written before checksums) passes
    unless `required`."""
    path = Path(path)
    where = where if expected else checksum_path(path).name
    expected = expected or recorded_sha256(path)
    if expected is None:
        if required:
            raise ChecksumError(f"{path}: no sha256 recorded ({checksum_path(path).name} missing)")
        return
    if not path.is_file():
        raise ChecksumError(f"{path}: file missing (its sha256 is recorded in {where})")
    got = sha256(path)
    if got != expected:
        raise ChecksumError(
            f"{path}: sha256 {got[:16]}… is not the {expected[:16]}… recorded in {where} when it was written: "
            "the file is truncated or corrupted; delete it and rerun the stage that wrote it"
        )


def cache_dir() -> Path:
    """The user's muke cache: $MUKE_CACHE, else ~/.cache/muke."""
    return Path(os.environ.get("MUKE_CACHE", "~/.cache/muke")).expanduser()
