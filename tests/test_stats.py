"""Second-moment statistics: joint pass = per-layer passes = direct computation; packed rows = padded
rows; bf16 autocast close to fp32; resume; refusal."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from muke.data import DataError
from muke.engine import hooks
from muke.model import load
from muke.update.corpus import batches, chunk_batches, load_corpus, pack, packed_inputs
from muke.update.stats import (
    StatsConfig,
    StatsError,
    accumulate,
    add_gram,
    collect_stats,
    load_stats,
    mirror,
    read_metadata,
)

DOCS = [
    "Velmora is a port city on the southern coast of the island of Castaran.",
    "Short.",
    "The Copper Bridge has seven arches covered in green copper plates, and every October thousands of "
    "paper lanterns float down the Orlen River during the Lantern Festival.",
    "Salt traders founded the city in 1412.",
    "Ilse Marrow was a physicist.\nShe worked at the Tollund Institute between 1921 and 1958.",
    "Quillon Robotics builds small underwater robots that inspect ship hulls.",
    "A noun names a person, place, thing or idea.",
]


@pytest.fixture(scope="module")
def em(tiny_qwen2_path):
    return load(tiny_qwen2_path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    return path


def config(corpus, layers, **kw):
    base = dict(layers=tuple(layers), corpus=str(corpus), batch_tokens=64, checkpoint_every=2, tokenize_chunk=3)
    return StatsConfig(**{**base, **kw})


def direct_second_moments(em, docs, layers, max_length):
    """Σ k kᵀ per layer, one unpadded document at a time, summed in float64 numpy."""
    sums = {l: np.zeros((344, 344)) for l in layers}
    count = 0
    for doc in docs:
        ids = em.tokenizer(doc, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for layer in layers:
                with hooks.capture(em.down_proj(layer), "input") as seen:
                    em.model(input_ids=ids)
                k = seen[0][0].double().numpy()
                sums[layer] += k.T @ k
        count += ids.shape[1]
    return sums, count


def test_joint_pass_equals_per_layer_passes_and_direct_computation(em, corpus, tmp_path):
    joint = load_stats(collect_stats(em, config(corpus, [0, 2]), tmp_path / "joint.safetensors", False), em, [0, 2])
    direct, count = direct_second_moments(em, DOCS, [0, 2], max_length=1024)
    for layer in (0, 2):
        single = load_stats(
            collect_stats(em, config(corpus, [layer]), tmp_path / f"l{layer}.safetensors", False), em, [layer]
        )
        assert torch.allclose(joint.mom2[layer], single.mom2[layer], rtol=1e-5, atol=1e-9)
        assert joint.count[layer] == single.count[layer] == count
        scale = np.abs(direct[layer]).max()
        np.testing.assert_allclose(joint.mom2[layer].double().numpy(), direct[layer], rtol=1e-4, atol=1e-6 * scale)
        C = joint.second_moment(layer)
        assert C.shape == (344, 344) and torch.allclose(C, C.T, atol=1e-9)
    meta = joint.meta
    assert meta["layers"] == [0, 2] and meta["n_documents"] == len(DOCS) and meta["tokens"] == count
    assert meta["model_type"] == "qwen2" and meta["hidden_size"] == 128 and meta["d_ff"] == 344
    assert len(meta["corpus_sha256"]) == 64 and meta["complete"]


def test_truncation_to_max_length(em, corpus, tmp_path):
    stats = load_stats(collect_stats(em, config(corpus, [1], max_length=5), tmp_path / "s.safetensors", False), em, [1])
    _, count = direct_second_moments(em, DOCS, [1], max_length=5)
    assert stats.count[1] == count <= 5 * len(DOCS)


class Killed(Exception):
    pass


@pytest.mark.parametrize("packed", [True, False])
def test_resume_after_interrupt_gives_identical_result(em, corpus, tmp_path, packed):
    cfg = config(corpus, [0, 1], pack=packed)
    whole = load_file(collect_stats(em, cfg, tmp_path / "whole.safetensors", False))
    n_batches = sum(
        len(list(chunk_batches(em, em.tokenizer(DOCS[i : i + 3])["input_ids"], cfg, 0))) for i in range(0, len(DOCS), 3)
    )

    out = tmp_path / "resumed.safetensors"
    calls = []

    def dying_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == n_batches - 1:
            raise Killed
        return type(em.model).forward(em.model, *args, **kwargs)

    em.model.forward = dying_forward
    try:
        with pytest.raises(Killed):
            collect_stats(em, cfg, out, False)
    finally:
        del em.model.forward
    partial = out.with_name(out.name + ".partial")
    assert partial.exists() and not out.exists()
    done = read_metadata(partial)["docs_done"]
    assert 0 < done < len(DOCS)

    calls.clear()
    em.model.forward = lambda *a, **k: (calls.append(1), type(em.model).forward(em.model, *a, **k))[1]
    try:
        collect_stats(em, cfg, out, False)
    finally:
        del em.model.forward
    assert 0 < len(calls) < n_batches  # continued, did not restart
    resumed = load_file(out)
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert not partial.exists()


def test_refuses_stats_of_another_model_layer_set_or_tokenizer(em, corpus, tmp_path, tiny_llama_path):
    path = collect_stats(em, config(corpus, [0, 2]), tmp_path / "s.safetensors", False)
    assert load_stats(path, em, [2]).count[2] > 0
    with pytest.raises(StatsError, match="another model"):
        load_stats(path, load(tiny_llama_path), [0, 2])
    with pytest.raises(StatsError, match=r"not the requested layers \[1\]"):
        load_stats(path, em, [1, 2])

    other = load(em.model.config._name_or_path)
    with torch.no_grad():
        other.down_proj(3).weight[0, 0] += 1.0
    with pytest.raises(StatsError, match="another model's weights"):
        load_stats(path, other, [0, 2])

    tensors = load_file(path)
    meta = read_metadata(path)
    meta["tokenizer_vocab_sha256"] = "0" * 64
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, forged, metadata={"muke": json.dumps(meta)})
    with pytest.raises(StatsError, match="tokenizer"):
        load_stats(forged, em, [0, 2])
    with pytest.raises(StatsError, match="not found"):
        load_stats(tmp_path / "missing.safetensors", em, [0])


def test_corpus_formats_and_seeded_subset(tmp_path, monkeypatch):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    docs, ident = load_corpus(jsonl)
    assert docs == DOCS and ident["n_corpus_documents"] == len(DOCS)
    sub, _ = load_corpus(jsonl, max_docs=3, seed=1)
    assert len(sub) == 3 and sub == load_corpus(jsonl, max_docs=3, seed=1)[0]
    assert sub == [d for d in DOCS if d in sub]  # corpus order kept
    jsonl.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match="line 2.*'text'"):
        load_corpus(jsonl)


def test_hub_corpus_is_streamed_and_picks_the_downloaded_subset(tmp_path, monkeypatch):
    """hf:NAME streams the train split (a local dataset folder here): with the card's split size the
    documents are exactly the downloaded dataset's seeded subset; without it a seeded stream shuffle."""
    import datasets

    from muke.update.corpus import _subset

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("MUKE_CACHE", str(tmp_path / "cache"))
    docs_all = [f"Document {i}: {DOCS[i % len(DOCS)]}" for i in range(60)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs_all))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "train.jsonl").write_text((folder / "train.jsonl").read_text())
    card = "---\ndataset_info:\n  splits:\n  - name: train\n    num_bytes: 0\n    num_examples: 60\n---\n"
    (folder / "README.md").write_text(card)

    def no_download(*args, **kwargs):
        raise AssertionError("the corpus was downloaded, not streamed")

    downloaded = datasets.load_dataset(str(folder), split="train").select(_subset(60, 7, 3))["text"]
    monkeypatch.setattr(datasets, "load_dataset", no_download)
    docs, ident_first = load_corpus(f"hf:{folder}", max_docs=7, seed=3)
    assert docs == downloaded and ident_first["n_corpus_documents"] == 60 and "sampling" not in ident_first
    shuffled, ident = load_corpus(f"hf:{bare}", max_docs=7, seed=3)
    assert len(shuffled) == 7 and set(shuffled) <= set(docs_all) and ident["sampling"].startswith("stream shuffle")
    assert shuffled == load_corpus(f"hf:{bare}", max_docs=7, seed=3)[0] != load_corpus(f"hf:{bare}", 7, seed=4)[0]

    # once streamed (muke prefetch on the submit host), a node without the hub reads the subset from the cache
    def no_hub(*args, **kwargs):
        raise AssertionError("streamed again")

    monkeypatch.setattr("muke.update.corpus.hf_documents", no_hub)
    assert load_corpus(f"hf:{folder}", max_docs=7, seed=3) == (downloaded, ident_first)
    with pytest.raises(AssertionError, match="streamed again"):
        load_corpus(f"hf:{folder}", max_docs=8, seed=3)


def test_batches_fit_the_token_budget():
    lengths = [3, 5, 2, 9, 1, 1, 20]
    spans = batches([[0] * n for n in lengths], 10)
    assert spans[0][0] == 0 and spans[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for a, b in spans:
        assert b - a == 1 or max(lengths[a:b]) * (b - a) <= 10


# ---- packing: several documents per row, each attending to itself only ----


def test_pack_places_every_document_once_within_the_width():
    lengths = [5, 3, 9, 1, 4, 4, 2, 9]
    rows = pack(lengths, 9)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 9 for row in rows)
    assert len(rows) == 5 == -(-sum(lengths) // 9)  # first-fit decreasing: no row wasted here


def test_packed_inputs_restart_positions_and_mask_other_documents():
    inputs, keep = packed_inputs([[7, 8, 9], [4, 5]], [[0, 1]], width=6, pad_id=0)
    assert inputs["input_ids"].tolist() == [[7, 8, 9, 4, 5, 0]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert keep.tolist() == [[True] * 5 + [False]]
    mask = inputs["attention_mask"][0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    additive, _ = packed_inputs([[7, 8, 9], [4, 5]], [[0, 1]], 6, 0, torch.float32)
    assert additive["attention_mask"].dtype == torch.float32
    assert torch.equal(additive["attention_mask"] == 0, inputs["attention_mask"])


@pytest.mark.parametrize("arch,attention", [("qwen2", "sdpa"), ("qwen2", "eager"), ("llama", "sdpa")])
def test_packed_statistics_equal_padded_statistics(arch, attention, corpus, tmp_path, request):
    em = load(request.getfixturevalue(f"tiny_{arch}_path"))
    em.model.set_attn_implementation(attention)
    stats = {}
    for packed in (True, False):
        cfg = config(corpus, [0, 2], pack=packed, batch_tokens=256, tokenize_chunk=7)
        stats[packed] = load_stats(collect_stats(em, cfg, tmp_path / f"{packed}.safetensors", False), em, [0, 2])
    for layer in (0, 2):
        assert stats[True].count[layer] == stats[False].count[layer]
        torch.testing.assert_close(
            stats[True].mom2[layer],
            stats[False].mom2[layer],
            rtol=1e-5,
            atol=1e-5 * stats[False].mom2[layer].abs().max().item(),
        )
    assert stats[True].meta["pack"] and not stats[False].meta["pack"]
    # fewer rows than documents: packing did pack
    ids = em.tokenizer(DOCS)["input_ids"]
    rows = sum(keep.shape[0] for _, _, keep in chunk_batches(em, ids, config(corpus, [0], batch_tokens=256), 0))
    assert rows < len(DOCS)


def test_packing_without_document_masks_would_change_the_statistics(em):
    """The block-diagonal mask is what makes packing exact: one causal row over concatenated documents
    (each attending to the documents before it) gives other second moments."""
    ids = em.tokenizer(DOCS[:3])["input_ids"]
    width = sum(map(len, ids))
    exact, naive = ({0: torch.zeros(344, 344)}, {0: 0}), ({0: torch.zeros(344, 344)}, {0: 0})
    inputs, keep = packed_inputs(ids, [[0, 1, 2]], width, 0)
    accumulate(em, [0], inputs, keep, *exact)
    accumulate(em, [0], {"input_ids": inputs["input_ids"]}, keep, *naive)
    rel = ((exact[0][0] - naive[0][0]).norm() / exact[0][0].norm()).item()
    assert exact[1][0] == naive[1][0] == width and rel > 1e-2


def test_bf16_forward_accumulates_in_fp32_close_to_fp32(em, corpus, tmp_path):
    layers = [0, 2]
    full = load_stats(collect_stats(em, config(corpus, layers), tmp_path / "fp32.safetensors", False), em, layers)
    half = load_stats(
        collect_stats(em, config(corpus, layers, dtype="bfloat16"), tmp_path / "bf16.safetensors", False), em, layers
    )
    assert half.meta["forward_dtype"] == "bfloat16" and full.meta["forward_dtype"] == "float32"
    for layer in layers:
        assert half.mom2[layer].dtype == torch.float32 and half.count[layer] == full.count[layer]
        rel = ((half.mom2[layer] - full.mom2[layer]).norm() / full.mom2[layer].norm()).item()
        print(f"\nlayer {layer}: relative Frobenius error of bf16-forward second moments {rel:.2e}")
        assert 0 < rel < 5e-2


@pytest.mark.parametrize("size", [344, 1536, 2100])
def test_upper_triangle_gram_mirrored_equals_the_full_product(size):
    torch.manual_seed(0)
    total = torch.zeros(size, size)
    for n in (37, 64):  # two batches: the sums accumulate
        add_gram(total, torch.randn(n, size))
    torch.manual_seed(0)
    k = torch.cat([torch.randn(37, size), torch.randn(64, size)])
    mirrored = mirror(total)
    assert torch.equal(mirrored, mirrored.T)
    torch.testing.assert_close(mirrored, k.T @ k, rtol=1e-5, atol=1e-4)


def test_chat_statistics_are_those_of_the_chat_rendered_documents(tmp_path, tiny_qwen2_path):
    """stats chat: C equals plain statistics over a JSONL of the documents as chat exchanges, and differs
    from the plain documents' C."""
    import json

    from muke.engine.windows import render_prompt
    from muke.model import load
    from muke.update.corpus import chat_documents
    from muke.update.stats import StatsConfig, collect_stats, load_stats

    em = load(tiny_qwen2_path)
    docs = ["The river is wide. It runs to the sea and floods in spring.", "Bread rises with yeast"]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    rendered = chat_documents(docs, em.tokenizer, em.end_of_turn)
    assert (
        rendered[0]
        == render_prompt(em.tokenizer, "The river is wide.")
        + "It runs to the sea and floods in spring."
        + em.end_of_turn
    )
    assert (
        rendered[1] == render_prompt(em.tokenizer, "Bread rises with yeast") + "Bread rises with yeast" + em.end_of_turn
    )
    oracle = tmp_path / "chat.jsonl"
    oracle.write_text("".join(json.dumps({"text": d}) + "\n" for d in rendered))

    def second_moment(path, chat):
        out = collect_stats(
            em,
            StatsConfig(layers=(1,), corpus=str(path), chat=chat),
            tmp_path / f"{path.stem}-{chat}.safetensors",
            progress=False,
        )
        return load_stats(out, em, (1,)).second_moment(1)

    chat = second_moment(corpus, True)
    assert torch.allclose(chat, second_moment(oracle, False), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(chat, second_moment(corpus, False), rtol=1e-3)
