"""Loaders, validation messages and the project's own demo resources (muke.data)."""

import json
import re
from pathlib import Path

import pytest

from muke.data import FORMATS, DataError, EditRequest, load_requests, load_requests_checked

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"  # benchmark samples: never copied into the project


def shared(rel):
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"benchmark sample {path} not available")
    return path


def words(text):
    return re.findall(r"\w+", text)


# ---------------------------------------------------------------------------- real samples


def test_unkebench_sample():
    reqs = load_requests(shared("unkebench/unkebench_v2_sample100.json"), "unkebench")
    raw = json.loads(shared("unkebench/unkebench_v2_sample100.json").read_text())[0]
    assert len(reqs) == 100
    r = reqs[0]
    assert r.id == str(raw["id"]) == "0"
    assert (r.question, r.para_question, r.answer) == (raw["question"], raw["para_question"], raw["answer"])
    assert r.sub_questions == tuple(raw["sub_question"]) and r.sub_answers == tuple(raw["sub_answer"])
    assert r.category is None and r.source == "unkebench_v2_sample100.json:0"


def test_mquake_sample():
    path = shared("akew/MQuAKE-CF_sample40.json")
    reqs = load_requests(path, "akew-mquake")
    raw = json.loads(path.read_text())[0]
    rw = raw["requested_rewrite"][0]
    assert len(reqs) == 40
    r = reqs[0]
    assert r.id == str(raw["case_id"])
    assert r.question == rw["question"] and r.answer == rw["fact_new_uns"] and r.para_question is None
    trips = rw["unsfact_triplets_GPT"][:5]
    assert r.sub_questions == tuple(t["prompt"].format(t["subject"]) for t in trips)
    assert r.sub_answers == tuple(t["target"] for t in trips)
    assert r.sub_questions[1] == "Ellie Kemper was born in"
    assert all(len(q.sub_questions) <= 5 for q in reqs)


def test_editeverything_sample():
    path = shared("editeverything/editevery_sample.json")
    reqs = load_requests(path, "editeverything")
    raw = json.loads(path.read_text())[0]
    assert len(reqs) == 70
    r = reqs[0]
    assert (r.id, r.question, r.answer, r.category) == (str(raw["id"]), raw["question"], raw["answer"], raw["category"])
    assert r.sub_questions == () and r.para_question is None
    assert {q.category for q in reqs} == {"physics", "biology", "math", "chemistry", "code", "poetry", "news"}


def test_wrong_format_names_the_fix():
    with pytest.raises(DataError, match=r"record 0 \(id '1'\): field 'requested_rewrite'.*akew-mquake"):
        load_requests(shared("akew/MQuAKE-CF_sample40.json"), "akew-counterfact")


def test_akew_counterfact_mapping(tmp_path):
    rec = {
        "case_id": 8,
        "paraphrase_prompts": ["Wellington's twin city is", "other"],
        "requested_rewrite": {
            "prompt_full": "What is the twin city of Wellington? It is",
            "fact_new_uns": "Sheffield, a city in South Yorkshire, England, ...",
            "unsfact_triplets_GPT": [
                {"subject": "Sheffield", "prompt": "{} is located in", "target": "South Yorkshire"}
            ]
            * 7,
        },
    }
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rec]))
    (r,) = load_requests(path, "akew-counterfact")
    assert (
        r.id == "8"
        and r.question.startswith("What is the twin city")
        and r.para_question == "Wellington's twin city is"
    )
    assert r.answer.startswith("Sheffield") and r.sub_questions == ("Sheffield is located in",) * 5
    assert r.sub_answers == ("South Yorkshire",) * 5


# ---------------------------------------------------------------------------- project resources


def test_demo_edits():
    reqs = load_requests(ROOT / "resources" / "demo_edits.jsonl", "jsonl")
    assert len(reqs) >= 24
    assert [r.id for r in reqs[:24]] == [f"demo-{i:02d}" for i in range(24)]
    assert len({r.category for r in reqs}) >= 5
    for r in reqs:
        assert 45 <= len(words(r.answer)) <= 160, r.id
        assert r.para_question and r.para_question != r.question
        assert 2 <= len(r.sub_questions) == len(r.sub_answers)


def test_to_dict_round_trip(tmp_path):
    reqs = load_requests(ROOT / "resources" / "demo_edits.jsonl", "jsonl")
    path = tmp_path / "copy.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs))
    again = load_requests(path, "jsonl")
    assert [r.to_dict() | {"source": None} for r in again] == [r.to_dict() | {"source": None} for r in reqs]
    assert isinstance(again[0], EditRequest)


def test_preservation_set():
    rows = [json.loads(line) for line in (ROOT / "resources" / "preservation.jsonl").read_text().splitlines()]
    assert len(rows) >= 40
    for row in rows:
        assert set(row) == {"instruction", "input", "output"} and row["instruction"].strip()
        assert 20 <= len(words(row["output"])) <= 80, row["instruction"]


def test_demo_corpus():
    text = (ROOT / "resources" / "demo_corpus.txt").read_text(encoding="utf-8")
    assert 150_000 <= len(text.encode()) <= 400_000
    docs = [d for d in text.split("\n\n") if d.strip()]
    assert len(docs) > 200
    for r in load_requests(ROOT / "resources" / "demo_edits.jsonl", "jsonl"):
        assert r.answer in text


# ---------------------------------------------------------------------------- fault injection

GOOD = {"id": "a", "question": "Q?", "answer": "A long answer."}


def write_jsonl(tmp_path, rows, name="edits.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


@pytest.mark.parametrize(
    "bad, where",
    [
        (b'{"id": "b", "question": "Q?", "answer": \n', "record 1 (line 2): invalid JSON"),
        (b'{"id": "b", "question": "Q\xff?", "answer": "x"}\n', "record 1 (line 2): not UTF-8"),
        ({"id": "b", "answer": "x"}, "record 1 (line 2) (id 'b'): field 'question': missing"),
        (
            {"id": "b", "question": "Q?", "answer": "  "},
            "record 1 (line 2) (id 'b'): field 'answer': must be a non-empty string",
        ),
        (
            {"id": "b", "question": "Q?", "answer": 3},
            "record 1 (line 2) (id 'b'): field 'answer': must be a non-empty string",
        ),
        ({"id": "a", "question": "Q?", "answer": "x"}, "record 1 (line 2) (id 'a'): field 'id': duplicate id"),
        (
            {"id": "b", "question": "Q?", "answer": "x", "sub_questions": ["s1", "s2"], "sub_answers": ["t1"]},
            "record 1 (line 2) (id 'b'): field 'sub_answers': has 1 entries but 'sub_questions' has 2",
        ),
        (
            {"id": "b", "question": "Q?", "answer": "x", "sub_questions": ["s1", ""], "sub_answers": ["t1", "t2"]},
            "record 1 (line 2) (id 'b'): field 'sub_questions[1]'",
        ),
        ({"id": ["b"], "question": "Q?", "answer": "x"}, "record 1 (line 2): field 'id'"),
        ([1, 2], "record 1 (line 2): must be a JSON object"),
    ],
)
def test_jsonl_faults(tmp_path, bad, where):
    path = write_jsonl(tmp_path, [GOOD, bad, {**GOOD, "id": "c"}])
    with pytest.raises(DataError) as e:
        load_requests(path, "jsonl")
    assert str(e.value).startswith(str(path)) and where in str(e.value)
    good, skipped = load_requests_checked(path, "jsonl", on_bad_record="skip")
    assert [r.id for r in good] == ["a", "c"] and len(skipped) == 1 and skipped[0].record == 1


def test_json_list_faults(tmp_path):
    path = tmp_path / "bench.json"
    path.write_bytes(b'[{"id": 0, "question": "Q?",\n "answer": }]')
    with pytest.raises(DataError, match=r"bench\.json: line 2: invalid JSON"):
        load_requests(path, "unkebench")
    path.write_bytes(b'[{"id": 0, "question": "Q\xe9?", "answer": "x"}]')
    with pytest.raises(DataError, match=r"bench\.json: line 1: not UTF-8"):
        load_requests(path, "unkebench")
    path.write_text(json.dumps({"id": 0}))
    with pytest.raises(DataError, match="expects a JSON list"):
        load_requests(path, "unkebench")


def test_nested_field_paths_and_skip(tmp_path):
    good = {
        "case_id": 1,
        "requested_rewrite": [
            {
                "question": "Q?",
                "fact_new_uns": "A.",
                "unsfact_triplets_GPT": [{"subject": "S", "prompt": "{} is", "target": "T"}],
            }
        ],
    }
    bad = json.loads(json.dumps(good).replace('"T"', '""').replace(": 1,", ": 2,"))
    path = tmp_path / "mq.json"
    path.write_text(json.dumps([good, bad, {**good, "case_id": 1}]))
    with pytest.raises(DataError) as e:
        load_requests(path, "akew-mquake")
    msg = str(e.value)
    assert "mq.json: record 1 (id '2'): field 'requested_rewrite[0].unsfact_triplets_GPT[0].target'" in msg
    good_reqs, skipped = load_requests_checked(path, "akew-mquake", "skip")
    assert [r.id for r in good_reqs] == ["1"]
    assert [(s.record, s.field) for s in skipped] == [
        (1, "requested_rewrite[0].unsfact_triplets_GPT[0].target"),
        (2, "case_id"),
    ]


def test_unknown_format_and_mode(tmp_path):
    path = write_jsonl(tmp_path, [GOOD])
    with pytest.raises(ValueError, match="unkebench"):
        load_requests(path, "csv")
    with pytest.raises(ValueError, match="on_bad_record"):
        load_requests_checked(path, "jsonl", "ignore")
    assert "jsonl" in FORMATS and len(FORMATS) == 5
