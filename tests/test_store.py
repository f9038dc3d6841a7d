"""The store shared by concurrent jobs (muke.store) and recorded checksums (muke.io): one computation per
entry, however many processes ask at once; a truncated or corrupted entry is computed again, a truncated
or corrupted artifact refused naming it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from muke.io import ChecksumError, checksum_path, record_sha256, recorded_sha256, sha256, verify_sha256, write_text
from muke.store import StoreError, ensure_entry, entry_lock

WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from muke.store import ensure_entry

    entry, counter, ready = map(Path, sys.argv[1:4])

    def compute(path):
        with open(counter, "a") as f:
            f.write("computed\\n")
        time.sleep(1.0)  # long enough for the other process to find the lock held
        path.write_text("sums")

    while not ready.exists():  # both processes start their ensure_entry together
        time.sleep(0.01)
    print("computed" if ensure_entry(entry, compute) else "found", flush=True)
    """
)


def test_two_processes_compute_an_entry_once(tmp_path):
    entry, counter, ready = tmp_path / "store" / "entry.bin", tmp_path / "counter", tmp_path / "ready"
    args = [sys.executable, "-c", WORKER, str(entry), str(counter), str(ready)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    ready.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(o.strip() for o, _ in outs) == ["computed", "found"]
    assert counter.read_text() == "computed\n"
    assert any("is computing this entry; waiting for it" in err for _, err in outs)
    assert entry.read_text() == "sums" and recorded_sha256(entry) == sha256(entry)
    assert not entry.with_name("entry.bin.owner").exists()


def test_a_lock_held_too_long_is_an_error_naming_the_lock_and_its_holder(tmp_path):
    entry = tmp_path / "entry.bin"
    with entry_lock(entry):
        with pytest.raises(StoreError, match=r"waited 0.2 s for pid \d+ on .* holds .*entry\.bin\.lock"):
            ensure_entry(entry, lambda path: path.write_text("x"), timeout=0.2)
    assert not entry.exists()


def _counting(calls: list):
    def compute(path: Path):
        calls.append(path)
        path.write_bytes(b"0123456789" * 10)

    return compute


@pytest.mark.parametrize("damage", ["truncate", "flip", "checksum gone"])
def test_a_damaged_entry_is_computed_again(tmp_path, damage, capfd):
    entry, calls = tmp_path / "entry.bin", []
    assert ensure_entry(entry, _counting(calls)) and len(calls) == 1
    assert not ensure_entry(entry, _counting(calls)) and len(calls) == 1  # found
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[:-7])
    elif damage == "flip":
        entry.write_bytes(data[:5] + bytes([data[5] ^ 1]) + data[6:])
    else:
        checksum_path(entry).unlink()
    assert ensure_entry(entry, _counting(calls)) and len(calls) == 2
    assert entry.read_bytes() == data and recorded_sha256(entry) == sha256(entry)
    assert "computing the entry again" in capfd.readouterr().err


def test_an_entry_from_before_checksums_is_adopted_where_whole(tmp_path):
    entry, calls = tmp_path / "entry.bin", []
    entry.write_text("old")
    assert not ensure_entry(entry, _counting(calls), legacy=lambda path: path.read_text() == "old")
    assert calls == [] and recorded_sha256(entry) == sha256(entry)


def test_verify_names_the_file_and_a_rewrite_drops_the_old_checksum(tmp_path):
    path = write_text(tmp_path / "a.json", "{}")
    verify_sha256(path)  # nothing recorded: passes unless required
    with pytest.raises(ChecksumError, match="no sha256 recorded"):
        verify_sha256(path, required=True)
    record_sha256(path)
    assert checksum_path(path).read_text() == f"{sha256(path)}  a.json\n"  # sha256sum -c reads it
    path.write_text("{ }")
    with pytest.raises(ChecksumError, match=rf"{path}: sha256 .* truncated or corrupted"):
        verify_sha256(path)
    write_text(path, "[]")  # an atomic rewrite: the old content's checksum goes with it
    assert recorded_sha256(path) is None
    with pytest.raises(ChecksumError, match="recorded in its index"):
        verify_sha256(path, "0" * 64)
