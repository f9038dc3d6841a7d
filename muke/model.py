"""Loading causal LMs and naming the modules μKE touches.

The architecture adapter answers "which module is decoder layer l, its MLP down-projection, the norm
(if any) between that projection and the residual stream, the final norm, the lm_head" for llama/qwen2/
mistral/phi3-style, gemma2/gemma3/olmo2-style and gpt2-style models, so no other module indexes layers by
magic attribute paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Adapter:
    """Dotted module paths of one architecture family.

    `attn_out` is the attention block's output projection inside a decoder layer (its output is what the
    attention adds to the residual stream, before any post-attention norm).
    `down_proj_transposed` is True where the down-projection stores its weight as (d_ff, d_model)
    (gpt2's Conv1D) instead of nn.Linear's (d_model, d_ff).
    `post_mlp_norm` names, inside a decoder layer, the RMSNorm N that the layer applies to the MLP output
    before adding it to the residual stream, h_out = h_mid + N(down_proj(k)) (Gemma 2/3, OLMo 2); None
    where h_out = h_mid + down_proj(k). N(x) = (norm_offset + weight) ⊙ x / sqrt(mean(x²) + eps): Gemma's
    norms multiply by 1 + weight, OLMo 2's by the weight.
    """

    layers: str
    down_proj: str
    final_norm: str
    lm_head: str = "lm_head"
    attn_out: str = "self_attn.o_proj"
    down_proj_transposed: bool = False
    post_mlp_norm: str | None = None
    norm_offset: float = 0.0


LLAMA_LIKE = Adapter(layers="model.layers", down_proj="mlp.down_proj", final_norm="model.norm")
GEMMA2_LIKE = Adapter(
    layers="model.layers",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    post_mlp_norm="post_feedforward_layernorm",
    norm_offset=1.0,
)
OLMO2_LIKE = Adapter(
    layers="model.layers",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    post_mlp_norm="post_feedforward_layernorm",
)
GPT2_LIKE = Adapter(
    layers="transformer.h",
    down_proj="mlp.c_proj",
    final_norm="transformer.ln_f",
    attn_out="attn.c_proj",
    down_proj_transposed=True,
)

ADAPTERS = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "phi3": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,  # Gemma 1: pre-norms only, the MLP output is added as is
    "gemma2": GEMMA2_LIKE,
    "gemma3_text": GEMMA2_LIKE,  # Gemma3ForCausalLM (the text-only checkpoints)
    "olmo2": OLMO2_LIKE,
    "gpt2": GPT2_LIKE,
}


class ModelError(ValueError):
    """A model that muke cannot edit (unknown architecture, layer out of range)."""


def check_architecture(model_type: str) -> None:
    if model_type not in ADAPTERS:
        raise ModelError(f"architecture {model_type!r} is not supported; known: {sorted(ADAPTERS)}")


def num_layers(config) -> int | None:
    """Decoder layers of a transformers config (or its config.json as a dict); None if it states none."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return get("num_hidden_layers") or get("n_layer")


def context_length(config, tokenizer) -> int | None:
    """The longest sequence the model takes: its position limit, or the tokenizer's if smaller."""
    limits = [
        getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
        tokenizer.model_max_length if tokenizer.model_max_length < 10**7 else None,
    ]
    limits = [x for x in limits if x]
    return min(limits) if limits else None


def pad(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest): each sequence padded with pad_id on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


class EditableModel:
    """A causal LM plus its adapter: the handles every stage asks for."""

    def __init__(self, model: nn.Module, tokenizer, adapter: Adapter | None = None):
        model_type = model.config.model_type
        if adapter is None:
            check_architecture(model_type)
            adapter = ADAPTERS[model_type]
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.model_type = model_type

    def _get(self, root: nn.Module, dotted: str) -> nn.Module:
        try:
            return root.get_submodule(dotted)
        except AttributeError:
            raise ModelError(
                f"architecture {self.model_type!r}: no module {dotted!r} in {type(root).__name__}, where its "
                "adapter (muke.model.ADAPTERS) expects one"
            ) from None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def layers(self) -> nn.ModuleList:
        return self._get(self.model, self.adapter.layers)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "hidden_size", None) or cfg.n_embd

    @property
    def context_length(self) -> int | None:
        return context_length(self.model.config, self.tokenizer)

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad token id, else 0: padded positions are masked out, so any id serves."""
        pad_id = self.tokenizer.pad_token_id
        return pad_id if pad_id is not None else 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def layer(self, index: int) -> nn.Module:
        self.check_layer(index)
        return self.layers[index]

    def check_layer(self, index: int) -> None:
        if not 0 <= index < self.n_layers:
            raise ModelError(f"layer {index} is out of range: the model has layers 0..{self.n_layers - 1}")

    def down_proj(self, index: int) -> nn.Module:
        return self._get(self.layer(index), self.adapter.down_proj)

    def down_proj_weight(self, index: int) -> torch.Tensor:
        """The down-projection weight as (d_model, d_ff) — a view, whatever the storage layout."""
        w = self.down_proj(index).weight
        return w.T if self.adapter.down_proj_transposed else w

    def attn_out(self, index: int) -> nn.Module:
        """Layer `index`'s attention output projection (the attention's contribution to the residual)."""
        return self._get(self.layer(index), self.adapter.attn_out)

    def post_mlp_norm(self, index: int) -> nn.Module | None:
        """The norm between layer `index`'s down-projection and the residual stream, None if there is none."""
        path = self.adapter.post_mlp_norm
        return None if path is None else self._get(self.layer(index), path)

    def post_mlp_norm_form(self, index: int) -> tuple[torch.Tensor, float]:
        """(gain (d_model,) fp32, eps) of layer `index`'s post-MLP norm N(x) = gain ⊙ x / sqrt(mean(x²) + eps)."""
        norm = self.post_mlp_norm(index)
        eps = next((getattr(norm, a) for a in ("eps", "variance_epsilon") if hasattr(norm, a)), None)
        if eps is None or not hasattr(norm, "weight"):
            raise ModelError(
                f"architecture {self.model_type!r}: the post-MLP norm {type(norm).__name__} is not an RMSNorm "
                "with a weight and an eps"
            )
        return self.adapter.norm_offset + norm.weight.detach().float(), float(eps)

    @property
    def final_norm(self) -> nn.Module:
        return self._get(self.model, self.adapter.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return self._get(self.model, self.adapter.lm_head)

    def head_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Logits from the final norm's output, as the model's own forward computes them: the LM head,
        then the final soft-capping of models that have one (gemma2)."""
        logits = self.lm_head(states)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    @property
    def end_of_turn(self) -> str:
        """The token that closes an assistant turn; part of every edit target (docs/ALGORITHM.md §1)."""
        tok = self.tokenizer.eos_token
        if not tok:
            raise ModelError("the tokenizer defines no eos_token: cannot mark the end of the edited answer")
        return tok


def cache_arg(model: nn.Module) -> str:
    """Name of the KV-cache argument of `model.forward` ("cache" from transformers 5.2x on,
    "past_key_values" before); outputs carry the cache under the same name."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(
    path: str | Path, dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False
) -> EditableModel:
    """Load a model and tokenizer from a local folder or hub id with `from_pretrained`.

    `trust_remote_code` runs Python code shipped with the checkpoint: off unless a config turns it on.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    model.to(resolve_device(device)).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return EditableModel(model, tokenizer)
