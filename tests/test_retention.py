"""Retention: answers against the model's own pre-edit answers; KL and perplexity shift on held-out texts."""

import math

import pytest
import torch

from muke.eval.retention import (
    UNRELATED_PROMPTS,
    answer_retention,
    edit_retention,
    held_out_texts,
    prefix_exact,
    text_shift,
    unrelated_questions,
)
from muke.model import load
from muke.update.weights import WeightUpdate

ANSWERS = [
    "Paris is the capital of France and its largest city.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Seven pencils at three coins each cost twenty-one coins.",
]


@pytest.fixture(scope="module")
def em(tiny_qwen2_path):
    return load(tiny_qwen2_path)


def low_rank_update(em, layer=1, rank=2, scale=1.0, seed=0):
    """A hand-made ΔW = U Vᵀ on one down-projection; scale 0 gives a zero update."""
    d_model, d_ff = em.down_proj_weight(layer).shape
    g = torch.Generator().manual_seed(seed)
    U = scale * torch.randn(d_model, rank, generator=g)
    V = torch.randn(d_ff, rank, generator=g) / math.sqrt(d_ff)
    return WeightUpdate("test", "memit", [layer], ["r0"], factors={layer: (U, V)})


def test_unrelated_questions_file():
    records = unrelated_questions()
    assert len(records) >= 24
    assert len({r["id"] for r in records}) == len(records)
    assert all(r["question"].strip().endswith("?") for r in records)


def test_unrelated_prompts_file_interleaves_four_kinds():
    records = unrelated_questions(UNRELATED_PROMPTS)
    kinds = ["question", "instruction", "code", "arithmetic"]
    assert len(records) >= 100 and len({r["id"] for r in records}) == len(records)
    assert [r["kind"] for r in records[:4]] == kinds and all(r["question"].strip() for r in records)
    assert {k: sum(r["kind"] == k for r in records) for k in kinds} == dict.fromkeys(kinds, 30)
    assert {r["kind"] for r in unrelated_questions()} == {"question"}  # a file without kinds


def test_prefix_exact_compares_the_first_tokens(em):
    tok = em.tokenizer
    ids = tok(ANSWERS[0], add_special_tokens=False)["input_ids"]
    changed_late = tok.decode(ids[:4]) + " and something else entirely"
    assert prefix_exact(tok, ANSWERS[:1], [changed_late], 3) == [True]
    assert prefix_exact(tok, ANSWERS[:1], [changed_late], len(ids)) == [False]
    assert prefix_exact(tok, ANSWERS, ANSWERS, 32) == [True] * 3
    assert prefix_exact(tok, [ANSWERS[0]], [tok.decode(ids[:2])], 32) == [False]  # ended early
    assert prefix_exact(tok, [], [], 8) == []
    with pytest.raises(ValueError):
        prefix_exact(tok, ANSWERS, ANSWERS[:1], 8)


def test_held_out_texts_are_the_first_documents():
    texts = held_out_texts(3)
    assert len(texts) == 3 and all(texts) and texts == held_out_texts(5)[:3]


def test_answer_retention():
    same = answer_retention(ANSWERS, ANSWERS)
    assert same["char_bleu"] == pytest.approx(100) and same["word_bleu"] == pytest.approx(100)
    assert same["exact_match"] == 100 and same["n"] == 3
    other = answer_retention(ANSWERS, ["I like green tea.", "No.", "The river is wide and slow."])
    assert other["char_bleu"] < 20 and other["word_bleu"] < 20 and other["exact_match"] == 0
    half = answer_retention(ANSWERS[:2], [ANSWERS[0], "No."])
    assert half["exact_match"] == 50 and [r["exact"] for r in half["rows"]] == [True, False]
    assert set(half["rows"][0]) == {"index", "pre", "post", "char_bleu", "word_bleu", "exact"}
    assert math.isnan(answer_retention([], [])["char_bleu"])
    with pytest.raises(ValueError):
        answer_retention(ANSWERS, ANSWERS[:1])


def test_no_update_and_zero_update_shift_nothing(em):
    texts = held_out_texts(3)
    none = text_shift(em, texts)
    zero = text_shift(em, texts, low_rank_update(em, scale=0.0))
    for shift in (none, zero):
        assert shift["kl"] == 0 and shift["ppl_pre"] == shift["ppl_post"] == none["ppl_pre"]
    lengths = [len(x) for x in em.tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    assert none["n_tokens"] == sum(n - 1 for n in lengths)
    assert 1 < none["ppl_pre"] < 2 * em.model.config.vocab_size


def test_a_real_update_shifts_predictions_and_is_reverted(em):
    before = {n: p.clone() for n, p in em.model.named_parameters()}
    shift = text_shift(em, held_out_texts(3), low_rank_update(em, scale=2.0))
    assert shift["kl"] > 1e-3 and shift["ppl_post"] != shift["ppl_pre"]
    assert all(torch.equal(p, before[n]) for n, p in em.model.named_parameters())


def test_padding_changes_nothing(em):
    texts = held_out_texts(5)
    update = low_rank_update(em, scale=2.0)
    one = text_shift(em, texts, update, batch_size=1)
    batched = text_shift(em, texts, update, batch_size=5)
    assert one["n_tokens"] == batched["n_tokens"]
    for key in ("kl", "ppl_pre", "ppl_post"):
        assert batched[key] == pytest.approx(one[key], rel=1e-5, abs=1e-5)


def test_edit_retention(em):
    questions = [r["question"] for r in unrelated_questions()[:3]]
    kept = edit_retention(em, low_rank_update(em, scale=0.0), questions, max_new_tokens=6)
    assert kept["exact_match"] == 100 and [r["question"] for r in kept["rows"]] == questions
    moved = edit_retention(em, low_rank_update(em, scale=20.0), questions, max_new_tokens=6)
    assert moved["exact_match"] < 100


def test_kl_and_perplexity_equal_a_direct_computation(em):
    """Oracle for one text: torch's kl_div and cross_entropy on an unpadded forward pass."""
    from muke.update.weights import apply

    text, update = held_out_texts(1)[0], low_rank_update(em, scale=2.0)
    ids = em.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        pre = torch.log_softmax(em.model(input_ids=ids).logits[0, :-1].float(), -1)
        with apply(em, update):
            post = torch.log_softmax(em.model(input_ids=ids).logits[0, :-1].float(), -1)
    kl = torch.nn.functional.kl_div(post, pre, log_target=True, reduction="batchmean").item()
    ppl = [math.exp(torch.nn.functional.nll_loss(lp, ids[0, 1:]).item()) for lp in (pre, post)]
    shift = text_shift(em, [text], update)
    assert shift["kl"] == pytest.approx(kl, rel=1e-5)
    assert [shift["ppl_pre"], shift["ppl_post"]] == pytest.approx(ppl, rel=1e-5)


def test_answer_shift_without_update_is_unchanged_and_a_real_update_moves_it(em):
    from muke.eval.retention import answer_shift

    questions = [r["question"] for r in unrelated_questions()[:3]]
    answers = ANSWERS
    same = answer_shift(em, questions, answers)
    assert same["first_kl"] == 0 and same["answer_kl"] == 0
    assert same["first_agreement"] == 100 and same["answer_agreement"] == 100 and same["n"] == 3
    n_answer = sum(len(em.tokenizer(a, add_special_tokens=False)["input_ids"]) - 1 for a in answers)
    assert same["n_tokens"] == n_answer
    moved = answer_shift(em, questions, answers, low_rank_update(em, scale=20.0))
    assert moved["first_kl"] > 1e-3 and moved["answer_kl"] > 1e-3 and moved["answer_agreement"] < 100
    # batching changes nothing beyond fp32 rounding
    one = answer_shift(em, questions, answers, low_rank_update(em, scale=20.0), batch_size=1)
    for key in ("first_kl", "answer_kl", "first_agreement", "answer_agreement"):
        assert one[key] == pytest.approx(moved[key], rel=1e-4, abs=1e-5)


def test_answer_shift_equals_a_direct_computation_at_the_prompts_last_token(em):
    """Oracle for one question: an unpadded forward pass of the rendered prompt alone."""
    from muke.engine.windows import render_prompt
    from muke.eval.retention import answer_shift
    from muke.update.weights import apply

    question, update = unrelated_questions()[0]["question"], low_rank_update(em, scale=20.0)
    ids = em.tokenizer(render_prompt(em.tokenizer, question), add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        pre = torch.log_softmax(em.model(input_ids=ids).logits[0, -1].float(), -1)
        with apply(em, update):
            post = torch.log_softmax(em.model(input_ids=ids).logits[0, -1].float(), -1)
    kl = (pre.exp() * (pre - post)).sum().item()
    got = answer_shift(em, [question], [ANSWERS[0]], update)
    assert got["first_kl"] == pytest.approx(kl, rel=1e-4)
    assert got["first_agreement"] == 100 * float(pre.argmax() == post.argmax())


def test_reference_and_rows_ask_with_the_runs_system_prompt(em, monkeypatch):
    """The reference answers, the edited answers and the teacher-forced drift all render the questions with
    the settings' system_prompt (the run's own), so pre and post differ by the edit alone."""
    from muke.eval import retention

    settings = dict(
        questions=None, n_questions=2, max_new_tokens=4, prefix_tokens=32, batch_size=2, texts=2, text_file=None,
        text_batch_size=2, max_length=32, system_prompt="Answer in one word.", chat_template=True,
    )  # fmt: skip
    prompts = []
    real = retention.render_prompt
    monkeypatch.setattr(retention, "render_prompt", lambda tok, q, *a: prompts.append(a) or real(tok, q, *a))
    monkeypatch.setattr("muke.eval.generate.render_prompt", retention.render_prompt)
    ref = retention.reference(em, settings)
    retention.locality_rows(em, ref, "edited", "r0", low_rank_update(em, scale=5.0))
    assert len(prompts) == 2 * 3 and set(prompts) == {("Answer in one word.", True)}


def test_rows_per_prompt_kind_and_prefix_match(em):
    """The default prompts' first four, one of each kind: first-token agreement and prefix match overall
    and per kind; the unedited model's are 1, an update that changes every answer drops them."""
    from muke.eval import retention

    settings = dict(
        questions=None, n_questions=4, max_new_tokens=4, prefix_tokens=32, batch_size=4, texts=1, text_file=None,
        text_batch_size=1, max_length=16,
    )  # fmt: skip
    ref = retention.reference(em, settings)
    assert ref.kinds == ["question", "instruction", "code", "arithmetic"]
    rows, samples = retention.locality_rows(em, ref, "pre-edit")
    found = {(r["task"], r["metric"]): r for r in rows}
    per_kind = {("retention", f"{m} ({k})") for k in ref.kinds for m in ("first_token_agreement", "prefix_exact_match")}
    assert per_kind <= set(found) and ("retention", "prefix_exact_match") in found
    assert all(found[key]["value"] == 1 and found[key]["n_samples"] == 1 for key in per_kind)
    assert found["retention", "prefix_exact_match"]["n_samples"] == 4
    assert [s["kind"] for s in samples] == ref.kinds and all(s["prefix_exact"] for s in samples)
    edited, _ = retention.locality_rows(em, ref, "edited", "r0", low_rank_update(em, scale=50.0))
    moved = {(r["task"], r["metric"]): r["value"] for r in edited}
    assert moved["retention", "prefix_exact_match"] < 1 and 0 <= moved["retention", "first_token_agreement"] <= 1
    assert moved["text_shift", "first_token_kl"] > 0
