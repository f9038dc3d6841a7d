"""Fluency measures on fixed strings with known values, and their bounds on any text."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from muke.eval.fluency import fluency, ngram_entropy, repetition_rate, words


def test_words_split_glued_loops_and_ignore_case():
    assert words("Daboatschu.daboatschu, DABOATSCHU!") == ["daboatschu"] * 3


@pytest.mark.parametrize(
    "text, rate",
    [
        ("The capital of France is Paris.", 0.0),
        ("x x x x x", 2 / 3),  # three 3-grams, two repeat the first
        ("same name.daboatschu.daboatschu.daboatschu.daboatschu", 1 / 4),  # (d, d, d) twice
        ("Dipped Dipped Dimmling Diluting Diluting Diluting Diluting", 1 / 5),
        ("too short", 0.0),
        ("", 0.0),
    ],
)
def test_repetition_rate_of_known_strings(text, rate):
    assert repetition_rate(text) == pytest.approx(rate)


def test_ngram_entropy_of_known_strings():
    # bigrams ab, ba, ab -> H = h(1/3); trigrams aba, bab -> 1 bit; ROME's weights 2/3, 4/3, then the mean
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h + 4 / 3 * 1.0) / 2)
    # n distinct words: log2(n - 1) and log2(n - 2) bits
    n = 10
    text = " ".join(f"w{i}" for i in range(n))
    assert ngram_entropy(text) == pytest.approx((2 / 3 * math.log2(n - 1) + 4 / 3 * math.log2(n - 2)) / 2)
    assert ngram_entropy("") == 0.0


def test_a_loop_scores_worse_than_the_sentence_it_repeats():
    sentence = "Velrumbel lies on the southern coast of the mainland"
    loop = sentence + " daboatschu" * 30
    assert repetition_rate(loop) > 0.5 > repetition_rate(sentence)
    assert fluency(loop)["repetition"] == repetition_rate(loop)
    assert fluency(loop)["ngram_entropy"] < ngram_entropy(sentence + " " + " ".join(f"w{i}" for i in range(30)))


@given(st.lists(st.text(alphabet="abcdefgh", min_size=1, max_size=6), max_size=40))
def test_repetition_rate_is_a_share(tokens):
    text = " ".join(tokens)
    assert 0.0 <= repetition_rate(text) < 1.0


@given(st.lists(st.text(alphabet="abcdefgh", min_size=1, max_size=6), min_size=3, max_size=20, unique=True))
def test_distinct_words_never_repeat_and_a_text_said_twice_does(tokens):
    text = " ".join(tokens)
    assert repetition_rate(text) == 0.0
    assert repetition_rate(text + " " + text) > 0.0


def test_fluency_columns_pair_each_answer_with_its_target():
    from muke.eval.fluency import FLUENCY_COLUMNS, fluency_columns

    loop, target = "x x x x x", "The capital of France is Paris."
    got = fluency_columns([loop, target], [target, target])
    assert tuple(got) == FLUENCY_COLUMNS
    assert got["repetition"] == pytest.approx([2 / 3, 0.0]) and got["target_repetition"] == [0.0, 0.0]
    assert got["ngram_entropy"] == pytest.approx([ngram_entropy(loop), ngram_entropy(target)])
    assert got["target_ngram_entropy"] == [ngram_entropy(target)] * 2
    with pytest.raises(ValueError):
        fluency_columns([loop], [])


def test_score_summary_averages_fluency_per_request_then_over_requests():
    import pandas as pd

    from muke.workflow.stages.score import _summary

    rows = [
        dict(id=rid, kind="sub_questions", index=i, family="paper", bleu=50.0, rouge_l=50.0, bertscore=50.0)
        | dict(edit_failed=False, repetition=rep, target_repetition=0.0, ngram_entropy=1.0, target_ngram_entropy=2.0)
        for rid, i, rep in (("a", 0, 0.0), ("a", 1, 1.0), ("b", 0, 0.2))
    ]
    summary = _summary(pd.DataFrame(rows)).iloc[0]
    assert summary["repetition"] == pytest.approx((0.5 + 0.2) / 2) and summary["target_repetition"] == 0
    assert summary["ngram_entropy"] == 1 and summary["target_ngram_entropy"] == 2 and summary["n"] == 2
