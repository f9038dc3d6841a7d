"""Fluency of a generated answer, to flag an edit that makes the model loop (docs/ALGORITHM.md §6).

- ``ngram_entropy``: ROME/MEMIT's generation-entropy measure, the weighted mean over n = 2, 3 (weights
  2/3, 4/3) of the entropy in bits of the text's word n-gram frequency distribution. A looping answer
  has few distinct n-grams and a low entropy; the measure also grows with length, so compare an answer
  with its target, not across lengths.
- ``repetition_rate``: the share of a text's word 3-grams that repeat an earlier 3-gram of the same text,
  in [0, 1]: 0 for a text that never repeats itself, → 1 for "daboatschu.daboatschu.daboatschu…".

Words are runs of letters, digits and underscores (``\\w+``), lower-cased, so punctuation that glues a
loop together ("a.a.a") does not hide it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

WORD = re.compile(r"\w+")
ENTROPY_ORDERS = ((2, 2 / 3), (3, 4 / 3))  # (n, weight), as ROME's compute_n_gram_entropy
REPEAT_ORDER = 3


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def entropy_bits(counts: Counter) -> float:
    """Entropy (bits) of the distribution `counts` describes; 0 for an empty one."""
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def ngram_entropy(text: str) -> float:
    """Weighted mean over n ∈ {2, 3} of the entropy of the word n-gram frequencies (ROME's measure)."""
    tokens = words(text)
    return sum(w * entropy_bits(Counter(ngrams(tokens, n))) for n, w in ENTROPY_ORDERS) / len(ENTROPY_ORDERS)


def repetition_rate(text: str, n: int = REPEAT_ORDER) -> float:
    """Share of word n-grams equal to an earlier n-gram of the same text; 0 when there are none."""
    grams = ngrams(words(text), n)
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def fluency(text: str) -> dict[str, float]:
    """Both measures of one text, as score columns."""
    return {"ngram_entropy": ngram_entropy(text), "repetition": repetition_rate(text)}


FLUENCY_COLUMNS = ("ngram_entropy", "repetition", "target_ngram_entropy", "target_repetition")


def fluency_columns(answers: Sequence[str], targets: Sequence[str]) -> dict[str, list[float]]:
    """`fluency` of each answer and, beside it, of its target (`target_` columns): the score stage's
    per-answer columns FLUENCY_COLUMNS, one value per pair."""
    if len(answers) != len(targets):
        raise ValueError(f"{len(answers)} answers for {len(targets)} targets")
    own = [fluency(a) for a in answers]
    known = {t: fluency(t) for t in dict.fromkeys(targets)}
    return {
        **{key: [f[key] for f in own] for key in ("ngram_entropy", "repetition")},
        **{f"target_{key}": [known[t][key] for t in targets] for key in ("ngram_entropy", "repetition")},
    }
