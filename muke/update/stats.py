"""Second-moment statistics C = E[k kᵀ] of the down_proj input k (docs/ALGORITHM.md §5, "Covariance statistics").

k: (d_ff,) is the input of the MLP down-projection of a decoder layer at one token position. One forward
pass over a batch hooks every requested layer and stops after the last of them; padded positions are
excluded. Sums Σ k kᵀ (upper triangle only, mirrored when saved: half the FLOPs) and counts are
accumulated in fp32, checkpointed every N documents (atomically), and a killed run resumes from its
checkpoint. The file keeps the SUM and the count (as ROME's runningstats); `Stats.second_moment` divides.

Documents are truncated to the model's max length, as MEMIT's statistics are. With `pack` (default)
several documents share a row instead of each being padded to the batch's longest, each attending only
to itself (muke.update.corpus), so the sums equal the padded ones up to fp rounding. With `dtype` the
forward pass runs under autocast (e.g. bf16 matmuls accumulating in fp32); the sums are fp32 either way.

File: safetensors `{f"layer{l}.mom2": (d_ff, d_ff) fp32 sum, f"layer{l}.count": () int64}` and one
metadata entry "muke", a JSON object describing the model, corpus and run.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from muke.data import DataError
from muke.engine import hooks
from muke.io import cache_dir, sha256, verify_sha256, write_safetensors
from muke.model import DTYPES, EditableModel
from muke.update.corpus import chat_documents, chunk_batches, load_corpus

FORMAT = "muke.stats/1"


class StatsError(ValueError):
    """A statistics file that cannot be used for this model, layer set or tokenizer."""


# ---------------------------------------------------------------------------- identities


def vocab_hash(tokenizer) -> str:
    """sha256 of the tokenizer's (token, id) pairs, sorted by id."""
    pairs = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def d_ff(em: EditableModel) -> int:
    return em.down_proj_weight(0).shape[1]


def model_fingerprint(em: EditableModel) -> str:
    """sha256 of the architecture and the first 16 values (rounded to bf16) of every parameter.

    Cheap for any model size; equal for the same checkpoint loaded in fp32 or bf16, different for
    other weights (another seed, another fine-tune).
    """
    digest = hashlib.sha256(json.dumps(architecture(em), sort_keys=True).encode())
    for name, p in em.model.named_parameters():
        head = p.detach().flatten()[:16].to(torch.bfloat16).view(torch.int16).cpu()
        digest.update(name.encode() + head.numpy().tobytes())
    return digest.hexdigest()


def architecture(em: EditableModel) -> dict:
    return {"model_type": em.model_type, "hidden_size": em.hidden_size, "d_ff": d_ff(em), "n_layers": em.n_layers}


# ---------------------------------------------------------------------------- files


def read_metadata(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "muke" not in meta:
        raise StatsError(f"{path}: not a muke statistics file (no 'muke' metadata)")
    return json.loads(meta["muke"])


# ---------------------------------------------------------------------------- collection


@dataclass(frozen=True)
class StatsConfig:
    """What to collect. max_length None → the model's max length (EditableModel.context_length)."""

    layers: tuple[int, ...]
    corpus: str
    max_docs: int | None = None
    max_length: int | None = None
    seed: int = 0
    text_field: str = "text"
    batch_tokens: int = 8192
    checkpoint_every: int = 1000  # documents between checkpoints
    tokenize_chunk: int = 256  # documents tokenized (and packed together) per call
    pack: bool = True  # several documents per row, each attending to itself only
    dtype: str | None = None  # autocast the forward pass ("bfloat16", "float16"); None: the model's dtype
    chat: bool = False  # each document as a chat exchange (muke.update.corpus.chat_documents)
    extra: dict = field(default_factory=dict)  # recorded in the metadata as is

    def __post_init__(self):
        if self.dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"stats dtype must be bfloat16, float16 or None (the model's), got {self.dtype!r}")


def _job(em: EditableModel, cfg: StatsConfig, corpus_ident: dict, n_docs: int, max_length: int) -> dict:
    """Everything the sums depend on; a checkpoint is resumed only when this matches exactly."""
    return {
        "format": FORMAT,
        "model": str(em.model.config._name_or_path),
        **architecture(em),
        "model_fingerprint": model_fingerprint(em),
        "tokenizer_vocab_sha256": vocab_hash(em.tokenizer),
        "dtype": str(em.dtype).removeprefix("torch."),
        "layers": sorted(set(cfg.layers)),
        **corpus_ident,
        "n_documents": n_docs,
        "seed": cfg.seed,
        "max_docs": cfg.max_docs,
        "max_length": max_length,
        "text_field": cfg.text_field,
        "batch_tokens": cfg.batch_tokens,
        "pack": cfg.pack,
        "forward_dtype": cfg.dtype or str(em.dtype).removeprefix("torch."),
        **({"chat": True} if cfg.chat else {}),
        **cfg.extra,
    }


def add_gram(total: torch.Tensor, k: torch.Tensor) -> None:
    """total += kᵀ k on and above the diagonal only, one block of rows at a time: Σ k kᵀ is symmetric, so
    this takes ~(1 + 1/n_blocks)/2 of the FLOPs of a full addmm_. Below the diagonal `total` is stale until
    `mirror` fills it in. k: (n, d_ff); total: (d_ff, d_ff)."""
    size = total.shape[0]
    block = max(256, -(-size // 8))
    for a in range(0, size, block):
        total[a : a + block, a:].addmm_(k[:, a : a + block].T, k[:, a:])


def mirror(total: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is total's, in place."""
    total.copy_(total.triu() + total.triu(1).T)
    return total


def sum_tensors(sums: dict[int, torch.Tensor], counts: dict[int, int]) -> dict[str, torch.Tensor]:
    """The file's tensors: each layer's sum (mirrored, `mirror`) and count."""
    out = {}
    for layer in sums:
        out[f"layer{layer}.mom2"] = mirror(sums[layer])
        out[f"layer{layer}.count"] = torch.tensor(counts[layer], dtype=torch.int64)
    return out


def _resume(partial: Path, job: dict, device) -> tuple[dict, dict, int, int] | None:
    """(sums, counts, docs_done, tokens) of a matching checkpoint, else None."""
    if not partial.exists():
        return None
    meta = read_metadata(partial)
    if meta.get("job") != job:
        return None
    with safe_open(str(partial), framework="pt") as f:
        sums = {l: f.get_tensor(f"layer{l}.mom2").to(device) for l in job["layers"]}
        counts = {l: int(f.get_tensor(f"layer{l}.count")) for l in job["layers"]}
    return sums, counts, meta["docs_done"], meta["tokens"]


@torch.no_grad()
def accumulate(
    em: EditableModel,
    layers: list[int],
    inputs: dict[str, torch.Tensor],
    keep: torch.Tensor,
    sums: dict[int, torch.Tensor],
    counts: dict[int, int],
    dtype: str | None = None,
) -> None:
    """sums[l] += Σ k kᵀ over the `keep` positions of one batch, all layers in one pass.

    inputs: model keyword arguments (input_ids (batch, T), attention_mask, ...); keep: (batch, T) bool;
    sums[l]: (d_ff, d_ff) fp32, valid on and above the diagonal (`add_gram`). dtype: autocast the
    forward pass to it (None: run as loaded).
    """
    keep = keep.to(em.device)
    device_type = em.device.type

    def sink_for(layer):
        def sink(k):  # k: (batch, T, d_ff)
            with torch.autocast(device_type, enabled=False):
                k = k[keep].float()  # (n, d_ff)
                add_gram(sums[layer], k)
            counts[layer] += k.shape[0]

        return sink

    cast = torch.autocast(device_type, dtype=DTYPES[dtype]) if dtype else nullcontext()
    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(hooks.capture(em.down_proj(layer), "input", sink_for(layer)))
        stack.enter_context(hooks.stop_after(em.layer(max(layers))))
        with cast:
            em.model(**{k: v.to(em.device) for k, v in inputs.items()}, use_cache=False)


def collect_stats(em: EditableModel, cfg: StatsConfig, out: str | Path, progress: bool = True) -> Path:
    """Collect E[k kᵀ] for cfg.layers over the corpus into `out`, resuming `out`.partial if present."""
    out = Path(out)
    layers = sorted(set(cfg.layers))
    for layer in layers:
        em.check_layer(layer)
    max_length = cfg.max_length or em.context_length
    if not max_length:
        raise ValueError("the model states no maximum length: pass max_length")
    docs, corpus_ident = load_corpus(cfg.corpus, cfg.max_docs, cfg.seed, cfg.text_field)
    if cfg.chat:
        docs = chat_documents(docs, em.tokenizer, em.end_of_turn)
    job = _job(em, cfg, corpus_ident, len(docs), max_length)
    partial = out.with_name(out.name + ".partial")

    tokenizer = em.tokenizer
    size = d_ff(em)
    state = _resume(partial, job, em.device)
    if state is None:
        sums = {l: torch.zeros(size, size, dtype=torch.float32, device=em.device) for l in layers}
        counts, done, tokens = {l: 0 for l in layers}, 0, 0
    else:
        sums, counts, done, tokens = state

    bar = tqdm(total=len(docs), initial=done, unit="doc", desc=f"stats layers {layers}", disable=not progress)
    start, run_tokens, last_ckpt = time.perf_counter(), 0, done
    while done < len(docs):
        # chunk ends at multiples of tokenize_chunk, so a resumed run forms the same batches
        end = (done // cfg.tokenize_chunk + 1) * cfg.tokenize_chunk
        ids = tokenizer(docs[done:end], truncation=True, max_length=max_length)["input_ids"]
        for finished, inputs, keep in chunk_batches(em, ids, cfg, em.pad_id):
            if inputs is not None:
                accumulate(em, layers, inputs, keep, sums, counts, cfg.dtype)
                n = int(keep.sum())
                tokens, run_tokens = tokens + n, run_tokens + n
            done += finished
            bar.update(finished)
            bar.set_postfix(tok_s=f"{run_tokens / (time.perf_counter() - start):.0f}")
            if done - last_ckpt >= cfg.checkpoint_every and done < len(docs):
                meta = {"job": job, "docs_done": done, "tokens": tokens}
                write_safetensors(partial, sum_tensors(sums, counts), {"muke": json.dumps(meta)})
                last_ckpt = done
    bar.close()
    if tokens == 0:
        raise DataError(cfg.corpus, "the documents contain no tokens")
    seconds = time.perf_counter() - start
    meta = {
        **job,
        "complete": True,
        "tokens": tokens,
        "tokens_per_second_last_run": run_tokens / seconds if seconds else None,
    }
    write_safetensors(out, sum_tensors(sums, counts), {"muke": json.dumps(meta)})
    partial.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------- loading


@dataclass
class Stats:
    """Second-moment sums per layer, loaded for one model. mom2[l]: (d_ff, d_ff) fp32 on CPU."""

    path: Path
    meta: dict
    mom2: dict[int, torch.Tensor]
    count: dict[int, int]
    cache: dict = field(default_factory=dict, repr=False)  # derived per-layer tensors (e.g. projectors)
    _sha256: str | None = field(default=None, repr=False)

    def second_moment(self, layer: int, device=None) -> torch.Tensor:
        """C = E[k kᵀ] = Σ k kᵀ / n: (d_ff, d_ff) fp32, a new tensor (divided in place of its copy: one
        d_ff² allocation on `device`)."""
        if layer not in self.mom2:
            raise StatsError(f"{self.path}: no statistics for layer {layer} (has {sorted(self.mom2)})")
        return self.mom2[layer].to(device or "cpu", copy=True).div_(self.count[layer])

    @property
    def sha256(self) -> str:
        """Hash of the file's bytes (computed once): the key of caches derived from these stats."""
        if self._sha256 is None:
            self._sha256 = sha256(self.path)
        return self._sha256


def check_compatible(meta: dict, em: EditableModel, layers, path) -> None:
    """Raise StatsError naming what differs: model architecture or weights, tokenizer, or layers."""
    mine = architecture(em)
    theirs = {k: meta.get(k) for k in mine}
    if theirs != mine:
        raise StatsError(
            f"{path}: statistics are for another model ({meta.get('model')!r}: {theirs}); this model is {mine}"
        )
    if meta.get("tokenizer_vocab_sha256") != vocab_hash(em.tokenizer):
        raise StatsError(f"{path}: statistics were collected with another tokenizer (vocabulary hash differs)")
    if meta.get("model_fingerprint") != model_fingerprint(em):
        raise StatsError(
            f"{path}: statistics are for another model's weights ({meta.get('model')!r}, "
            "same architecture, different parameters)"
        )
    missing = sorted(set(layers) - set(meta.get("layers", [])))
    if missing:
        raise StatsError(f"{path}: statistics cover layers {meta.get('layers')}, not the requested layers {missing}")


def load_stats(path: str | Path, em: EditableModel, layers) -> Stats:
    """Load the statistics of `layers` from a file made for this model and tokenizer (else StatsError)."""
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"{path}: statistics file not found")
    verify_sha256(path)  # where its sha256 was recorded (muke.store, the collect_stats stage)
    meta = read_metadata(path)
    if not meta.get("complete"):
        raise StatsError(f"{path}: statistics file is incomplete")
    layers = sorted(set(layers))
    check_compatible(meta, em, layers, path)
    with safe_open(str(path), framework="pt") as f:
        mom2 = {l: f.get_tensor(f"layer{l}.mom2") for l in layers}
        count = {l: int(f.get_tensor(f"layer{l}.count")) for l in layers}
    return Stats(path, meta, mom2, count)


# ---------------------------------------------------------------------------- cache


def cached_stats(em: EditableModel, cfg: StatsConfig, progress: bool = True) -> Stats:
    """Stats for cfg, from the cache or collected into it (once, however many processes ask: muke.store);
    keyed by model weights, layers, corpus and every setting the sums depend on."""
    from muke.store import complete_safetensors, ensure_entry

    docs_ident = sha256(cfg.corpus) if Path(cfg.corpus).is_file() else cfg.corpus
    key = {
        **asdict(cfg),
        "corpus": docs_ident,
        "layers": sorted(set(cfg.layers)),
        "model": model_fingerprint(em),
        "checkpoint_every": None,
        "tokenize_chunk": None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    layers = "-".join(map(str, key["layers"]))
    path = cache_dir() / "stats" / f"{em.model_type}-L{layers}-{digest}.safetensors"
    ensure_entry(path, lambda out: collect_stats(em, cfg, out, progress), legacy=complete_safetensors)
    return load_stats(path, em, cfg.layers)
