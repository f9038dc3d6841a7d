"""Greedy generation: batching changes nothing, prompts are left-padded, rows cover the requested kinds."""

import pytest
import torch

from muke.data import EditRequest
from muke.generate import answer_length, generation_rows, greedy, left_pad
from muke.model import load
from muke.tiny import build_tiny_model
from muke.windows import render_prompt

QUESTIONS = ["What is the capital of France?", "Tell me a long story about a dragon and a brave knight.",
             "Hi", "Who wrote Hamlet?"]


@pytest.fixture(scope="module")
def em(request, tmp_path_factory):
    try:
        path = request.getfixturevalue("tiny_qwen2_path")
    except pytest.FixtureLookupError:
        path = build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2")
    return load(path)


def first_greedy_token(em, question: str) -> int:
    ids = em.tokenizer(render_prompt(em.tokenizer, question), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return em.model(ids.input_ids).logits[0, -1].argmax().item()


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_answer_length_counts_the_stop_token():
    assert answer_length([4, 9, 2, 2], {2}) == 3
    assert answer_length([4, 9], {2}) == 2


def test_batched_equals_sequential(em, monkeypatch):
    # Make question 1's first greedy token a stop token so that rows stop at different steps.
    stop = first_greedy_token(em, QUESTIONS[1])
    eot = em.tokenizer.convert_tokens_to_ids(em.end_of_turn)
    monkeypatch.setattr(em.model.generation_config, "eos_token_id", [eot, stop])
    batched = greedy(em, QUESTIONS, max_new_tokens=10, batch_size=4)
    sequential = [greedy(em, [q], max_new_tokens=10)[0] for q in QUESTIONS]
    assert [(g.prompt, g.text, g.n_tokens) for g in batched] == [(g.prompt, g.text, g.n_tokens) for g in sequential]
    lengths = [g.n_tokens for g in batched]
    assert min(lengths) == 1 and max(lengths) > 1
    assert all(g.seconds > 0 and g.text == g.text.strip() for g in batched)


def test_prompts_are_left_padded(em, monkeypatch):
    masks = []
    original = em.model.generate

    def spy(**kwargs):
        masks.append(kwargs["attention_mask"])
        return original(**kwargs)

    monkeypatch.setattr(em.model, "generate", spy)
    greedy(em, ["Hi", QUESTIONS[1]], max_new_tokens=1)
    (mask,) = masks
    assert mask[:, -1].all() and not mask[0, 0] and mask[1].all()


def test_generation_rows_kinds(em):
    full = EditRequest(id="a", question="Who is Ada?", answer="A mathematician.", para_question="Tell me about Ada.",
                       sub_questions=("Born when?", "Known for?"), sub_answers=("1815.", "Programs."))
    bare = EditRequest(id="b", question="What is tea?", answer="A drink.")
    rows = generation_rows(em, [full, bare], max_new_tokens=2)
    assert [(r["id"], r["kind"], r["index"], r["target"]) for r in rows] == [
        ("a", "question", 0, "A mathematician."), ("a", "para_question", 0, "A mathematician."),
        ("a", "sub_questions", 0, "1815."), ("a", "sub_questions", 1, "Programs."), ("b", "question", 0, "A drink.")]
    assert rows[2]["prompt"] == "Born when?"
    assert set(rows[0]) == {"id", "kind", "index", "prompt", "output", "target", "n_tokens", "seconds"}
    only = generation_rows(em, [full, bare], kinds=("para_question",), max_new_tokens=2)
    assert [(r["id"], r["kind"]) for r in only] == [("a", "para_question")]
    with pytest.raises(ValueError, match="unknown question kinds"):
        generation_rows(em, [full], kinds=("answer",))
