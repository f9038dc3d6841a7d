"""The widths of a decoder-only model that muke estimate's memory and work figures depend on: from a
prepared folder's or local source's config.json, `KNOWN_WIDTHS` for the presets' hub ids, or the tiny
recipe (muke.tiny)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
    "max_position_embeddings",
)
# config.json values (CONFIG_KEYS, in order) of the presets' hub ids: no hub access needed to plan
KNOWN_WIDTHS = {
    name: dict(zip(CONFIG_KEYS, values))
    for name, values in {
        "Qwen/Qwen2.5-7B-Instruct": ("qwen2", 3584, 18944, 28, 28, 4, 152064, False, 32768),
        "meta-llama/Meta-Llama-3-8B-Instruct": ("llama", 4096, 14336, 32, 32, 8, 128256, False, 8192),
        "smollm2": ("llama", 576, 1536, 30, 9, 3, 49152, True, 8192),
    }.items()
}


@dataclass(frozen=True)
class Widths:
    """The sizes of a decoder-only model that its memory depends on."""

    model_type: str
    hidden: int
    d_ff: int
    n_layers: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied: bool
    context: int
    stored_dtype: str | None = None  # the checkpoint's dtype (config.json), None where it states none

    @classmethod
    def from_config(cls, c: dict) -> Widths:
        heads = c["num_attention_heads"]
        return cls(
            model_type=c.get("model_type", "llama"),
            hidden=c["hidden_size"],
            d_ff=c["intermediate_size"],
            n_layers=c["num_hidden_layers"],
            vocab=c["vocab_size"],
            n_heads=heads,
            n_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            tied=bool(c.get("tie_word_embeddings", False)),
            context=c.get("max_position_embeddings", 4096),
            stored_dtype=c.get("dtype") or c.get("torch_dtype"),
        )

    def block_params(self) -> int:
        """One decoder block: attention (q, k, v with qwen2's biases, o), the gated MLP, two norms."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        bias = q + 2 * kv if self.model_type == "qwen2" else 0
        return self.hidden * (q + 2 * kv) + bias + q * self.hidden + 3 * self.hidden * self.d_ff + 2 * self.hidden

    def params(self, layers: int | None = None) -> int:
        """Parameters of the whole model (or of its embedding and first `layers` blocks)."""
        if layers is not None:
            return self.vocab * self.hidden + layers * self.block_params()
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + self.n_layers * self.block_params() + self.hidden

    def token_activations(self, b: int) -> int:
        """Bytes of one token's activations inside one block's forward pass (b-byte dtype): the hidden
        state, q/k/v/attention output, the MLP's gate, up and product (sdpa attention: no T² term)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return b * (4 * self.hidden + 2 * q + 2 * kv + 3 * self.d_ff)


def widths_of(model, prepared_dir: str | Path | None = None) -> Widths:
    """A planned model's widths: the prepared folder's config.json, a local source's, the known table
    for a hub id, or the tiny recipe (muke.tiny)."""
    for folder in (prepared_dir, model.spec.params.get("source")):
        if folder and (Path(folder) / "config.json").is_file():
            return Widths.from_config(json.loads((Path(folder) / "config.json").read_text()))
    source = model.spec.params["source"]
    if source in KNOWN_WIDTHS:
        return Widths.from_config(KNOWN_WIDTHS[source])
    if source == "tiny":
        from muke.tiny import tiny_config

        class _Vocab:  # the tiny tokenizer's trained vocabulary size (muke.tiny.train_tokenizer)
            eos_token_id, pad_token_id = 2, 0

            def __len__(self):
                return 3000

        return Widths.from_config(tiny_config(model.spec.params["tiny"]["arch"], _Vocab()).to_dict())
    raise ValueError(
        f"model {model.name}: widths of {source!r} unknown: prepare it first, or give a local folder with config.json"
    )
