"""The statistics corpus (docs/ALGORITHM.md §5, "Covariance statistics"): loading documents, and forming them
into batches, padded (one document per row) or packed (several per row, each attending to itself only).

Packing: every document restarts at position 0 and attends only to itself (a block-diagonal causal
mask), so its hidden states are those of a forward pass of the document alone and the sums equal the
padded ones up to fp rounding. (Packing without the per-document mask would let documents attend to
the ones before them: other statistics.) Batches are a function of the documents alone, so a run
resumed at a chunk boundary forms the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from muke.data import DataError, jsonl_records
from muke.io import cache_dir, sha256, write_json
from muke.model import EditableModel, pad

if TYPE_CHECKING:
    from muke.update.stats import StatsConfig


def chat_documents(docs: list[str], tokenizer, end_of_turn: str) -> list[str]:
    """Each document as one chat exchange: its first sentence as the user turn (render_prompt: no system
    turn, as every edit prompt), the rest as the assistant's answer closed by
    `end_of_turn` (a one-sentence document answers itself).

    μKE's first window writes its memory at the prompt's last token, the same template token in every
    chat prompt; statistics of plain text hold no such key, so nothing holds that direction back
    (docs/STUDY-smollm2.md, study 4). These documents put the template's keys into C.
    """
    from muke.engine.windows import render_prompt

    out = []
    for doc in docs:
        first, *rest = re.split(r"(?<=[.!?])\s+", doc.strip(), maxsplit=1)
        out.append(render_prompt(tokenizer, first) + (rest[0] if rest else first) + end_of_turn)
    return out


def sentences(text: str) -> list[str]:
    """The sentences of a text: split after ".", "!" or "?" followed by white space."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _subset(n_total: int, max_docs: int | None, seed: int) -> list[int]:
    """All indices, or a seeded random subset of `max_docs` of them in corpus order."""
    if max_docs is None or max_docs >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), max_docs))


def _read_local(path: Path, text_field: str) -> list[str]:
    """Documents of a .txt file (separated by blank lines) or a JSONL file (field `text_field`)."""
    if path.suffix in (".jsonl", ".json"):
        return [rec[text_field] for rec in jsonl_records(path, (text_field,))]
    text = path.read_text(encoding="utf-8-sig")
    return [d.strip() for d in re.split(r"\n[ \t]*\n", text) if d.strip()]


STREAM_SHUFFLE_BUFFER = 10_000


def hf_documents(corpus: str, max_docs: int | None, seed: int, text_field: str) -> tuple[list[str], dict]:
    """The `_subset` of a hub (or local) dataset's train split, streamed: only the chosen documents are kept,
    nothing is written to disk (English Wikipedia is ~20 GB; 100k documents are ~1.5 % of it).

    Where the dataset card states the split's size (hub parquet exports do), the documents are exactly those
    the downloaded dataset would give (the same seeded indices, read in one pass that stops after the last);
    else a seeded shuffle of the stream (buffer STREAM_SHUFFLE_BUFFER) takes the first max_docs, recorded as
    `sampling` in the identity.
    """
    import datasets

    name, _, config = corpus[3:].partition(":")
    builder = datasets.load_dataset_builder(name, config or None)
    stream = builder.as_streaming_dataset(split="train")
    splits = builder.info.splits or {}
    n_total = splits["train"].num_examples if "train" in splits and splits["train"].num_examples else None
    ident = {"corpus": corpus, "corpus_sha256": builder.hash, "n_corpus_documents": n_total}
    if n_total is None:
        if max_docs is not None:
            stream = stream.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER).take(max_docs)
            ident["sampling"] = f"stream shuffle, seed {seed}, buffer {STREAM_SHUFFLE_BUFFER}"
        return [row[text_field] for row in stream], ident
    wanted = _subset(n_total, max_docs, seed)
    chosen, docs = set(wanted), []
    for i, row in enumerate(stream):
        if i in chosen:
            docs.append(row[text_field])
            if len(docs) == len(wanted):
                break
    if len(docs) < len(wanted):
        raise DataError(corpus, f"the train split has fewer documents than its card's {n_total}")
    return docs, ident


def _cached_hf_documents(corpus: str, max_docs: int | None, seed: int, text_field: str) -> tuple[list[str], dict]:
    """`hf_documents`, kept under $MUKE_CACHE/corpora once streamed: `muke prefetch` streams the subset on the
    submit host, and a compute node without the hub reads the same documents (and identity) from there."""
    from muke.hub import missing_offline

    key = json.dumps([corpus, max_docs, seed, text_field])
    path = cache_dir() / "corpora" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        return saved["documents"], saved["identity"]
    with missing_offline(f"statistics corpus {corpus}"):
        docs, ident = hf_documents(corpus, max_docs, seed, text_field)
    write_json(path, {"key": key, "identity": ident, "documents": docs})
    return docs, ident


def load_corpus(
    corpus: str | Path, max_docs: int | None = None, seed: int = 0, text_field: str = "text"
) -> tuple[list[str], dict]:
    """Documents and the corpus identity {corpus, corpus_sha256, n_corpus_documents}.

    `corpus`: a local .txt / .jsonl path, or "hf:NAME[:CONFIG]" for the train split of a `datasets` dataset
    (e.g. "hf:wikimedia/wikipedia:20231101.en"), streamed (`hf_documents`); its identity is the builder's hash.
    """
    corpus = str(corpus)
    if corpus.startswith("hf:"):
        return _cached_hf_documents(corpus, max_docs, seed, text_field)
    path = Path(corpus)
    if not path.is_file():
        raise DataError(path, "corpus file not found")
    all_docs = _read_local(path, text_field)
    if not all_docs:
        raise DataError(path, "the corpus has no documents")
    docs = [all_docs[i] for i in _subset(len(all_docs), max_docs, seed)]
    return docs, {"corpus": str(path), "corpus_sha256": sha256(path), "n_corpus_documents": len(all_docs)}


def batches(token_ids: list[list[int]], batch_tokens: int) -> list[tuple[int, int]]:
    """Greedy [start, end) document ranges whose padded size (rows × longest) fits `batch_tokens`;
    a longer document forms a batch of its own."""
    out, start, longest = [], 0, 0
    for i, ids in enumerate(token_ids):
        longest_with = max(longest, len(ids))
        if i > start and longest_with * (i - start + 1) > batch_tokens:
            out.append((start, i))
            start, longest_with = i, len(ids)
        longest = longest_with
    if start < len(token_ids):
        out.append((start, len(token_ids)))
    return out


def pack(lengths: list[int], width: int) -> list[list[int]]:
    """Document indices per row: first-fit decreasing into rows of `width` tokens (every length ≤ width).

    Longest documents first, each into the first row with room for it. A function of the lengths alone.
    """
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def packed_inputs(
    token_ids: list[list[int]],
    rows: list[list[int]],
    width: int,
    pad_id: int,
    additive_mask_dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(model inputs, keep) of packed rows: documents `rows[b]` of `token_ids` side by side in row b.

    input_ids, position_ids: (B, width), positions restart at 0 for every document; attention_mask:
    (B, 1, width, width), True where query and key lie in the same document and the key is not later
    (block-diagonal causal; with `additive_mask_dtype`, 0 there and the dtype's minimum elsewhere, as
    eager attention adds it); keep: (B, width) bool, the document tokens. The padding after a row's last
    document is a segment of its own, so that no query sees only masked keys.
    """
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    positions = torch.zeros((B, width), dtype=torch.long)
    segment = torch.zeros((B, width), dtype=torch.long)
    keep = torch.zeros((B, width), dtype=torch.bool)
    for b, docs in enumerate(rows):
        at = 0
        for s, d in enumerate(docs):
            n = len(token_ids[d])
            ids[b, at : at + n] = torch.tensor(token_ids[d], dtype=torch.long)
            positions[b, at : at + n] = torch.arange(n)
            segment[b, at : at + n] = s
            at += n
        if at > width:
            raise ValueError(f"row {b}: {at} tokens do not fit a row of {width}")
        keep[b, :at] = True
        positions[b, at:] = torch.arange(width - at)
        segment[b, at:] = len(docs)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]  # (B, 1, query, key)
    if additive_mask_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=additive_mask_dtype).masked_fill(
            ~mask, torch.finfo(additive_mask_dtype).min
        )
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask}, keep


def can_pack(em: EditableModel, width: int) -> bool:
    """Whether block-diagonal masks reproduce the model's own attention for documents of ≤ width tokens:
    not for flash-attention kernels (no 4D masks), nor beyond an active sliding window."""
    cfg = em.model.config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return "flash" not in str(cfg._attn_implementation) and (window is None or width <= window)


def chunk_batches(em: EditableModel, ids: list[list[int]], cfg: StatsConfig, pad_id: int):
    """(documents finished, model inputs, keep) per batch of one tokenized chunk of documents.

    Padded batches (`batches`) count their documents as they go; packed rows mix the chunk's documents,
    so a packed chunk counts all of them after its last batch (a checkpoint never splits it).
    """
    nonempty = [i for i, x in enumerate(ids) if x]
    width = max((len(ids[i]) for i in nonempty), default=0)
    if cfg.pack and nonempty and can_pack(em, width):
        rows = [[nonempty[j] for j in row] for row in pack([len(ids[i]) for i in nonempty], width)]
        per_batch = max(1, cfg.batch_tokens // width)
        additive = em.dtype if em.model.config._attn_implementation == "eager" else None
        for start in range(0, len(rows), per_batch):
            inputs, keep = packed_inputs(ids, rows[start : start + per_batch], width, pad_id, additive)
            yield (len(ids) if start + per_batch >= len(rows) else 0), inputs, keep
        return
    for a, b in batches(ids, cfg.batch_tokens):
        rows = [x for x in ids[a:b] if x]
        if not rows:
            yield b - a, None, None
            continue
        input_ids, mask = pad(rows, pad_id)
        yield b - a, {"input_ids": input_ids, "attention_mask": mask}, mask.bool()
