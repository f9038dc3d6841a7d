"""Case study HTML: where answers leave the target, escaping, one block per request, a column per method."""

import re

import pandas as pd
import pytest

from muke.eval.case_study import case_study_html, first_divergence, reproduced, unrelated_prompts


@pytest.mark.parametrize(
    "output, target, expected",
    [
        ("Paris is the capital.", "Paris is the capital.", -1),  # identical
        ("Paris is the capital. It is large.", "Paris is the capital.", -1),  # target reproduced, more follows
        ("Paris is big.", "Paris is the capital.", 9),  # differs at "b"
        ("Paris", "Paris is the capital.", 5),  # stops early
        ("", "Paris", 0),
        ("", "", -1),
        ("anything", "", -1),
        ("  Paris\n is \tthe  capital. ", "Paris is the capital.", -1),  # whitespace runs collapse
        ("Paris  is big", "Paris is\nthe capital", 9),  # index in the normalised strings
    ],
)
def test_first_divergence(output, target, expected):
    assert first_divergence(output, target) == expected


def test_reproduced():
    assert reproduced("Paris is big.", "Paris is the capital.") == 9
    assert reproduced("Paris is the capital!!", " Paris is the capital") == 20


def rows():
    data = [
        ("r1", "pre-edit", "I do not know.", "Velmora is a port city.", "What is Velmora?"),
        ("r1", "memit", "Velmora is a town.", "Velmora is a port city.", "What is Velmora?"),
        (
            "r1",
            "muke-memit",
            "Velmora is a port city. <script>alert(1)</script>",
            "Velmora is a port city.",
            "What is Velmora?",
        ),
        ("r2", "memit", "<b>bold</b>", "A <tag> & more", "Is <script>x</script> safe?"),
        ("r2", "pre-edit", "No idea", "A <tag> & more", "Is <script>x</script> safe?"),
    ]
    df = pd.DataFrame(data, columns=["id", "method", "output", "target", "question"])
    return df.assign(kind="question")


def test_one_block_per_request_with_a_column_per_method():
    out = case_study_html(rows())
    blocks = re.findall(r"<section class='case-study'>.*?</section>", out)
    assert len(blocks) == 2 and ">r1</h3>" in blocks[0] and ">r2</h3>" in blocks[1]
    for block in blocks:
        assert re.findall(r"<th>(.*?)</th>", block) == ["target", "pre-edit", "memit", "muke-memit"]
    assert blocks[1].count("<td>—</td>") == 1  # r2 has no muke-memit answer
    assert "23 / 23 target characters" in blocks[0]  # muke-memit reproduced all of it


def test_mark_starts_at_the_first_divergent_character():
    block = re.findall(r"<section class='case-study'>.*?</section>", case_study_html(rows()))[0]
    assert "<td>Velmora is a <mark class='diverge'>town.</mark>" in block
    assert "13 / 23 target characters" in block
    assert "<td><mark class='diverge'>I do not know.</mark>" in block
    assert "<td>Velmora is a port city.<mark class='diverge'> &lt;script&gt;" in block


def test_everything_is_escaped():
    out = case_study_html(rows())
    assert "<script>" not in out and "<b>bold" not in out and "<tag>" not in out
    assert "&lt;b&gt;bold&lt;/b&gt;" in out
    assert "&lt;script&gt;x&lt;/script&gt;" in out and "A &lt;tag&gt; &amp; more" in out


def test_kind_limit_and_duplicates():
    df = pd.concat([rows(), rows().assign(kind="para_question", output="other")])
    assert case_study_html(df) == case_study_html(rows())
    assert case_study_html(rows(), limit=1).count("<section") == 1
    with pytest.raises(ValueError, match="several"):
        case_study_html(pd.concat([rows(), rows()]))


def unrelated(request_ids=("r1",), methods=("memit", "muke-memit")):
    """Retention answers (muke.eval.tables.unrelated_rows) to five prompts of four kinds: the edit of
    `memit` changes the answer to the instruction, every other answer equals the unedited one."""
    prompts = [
        ("p-q00", "question", "Which planet is red?", "Mars."),
        ("p-q01", "question", "Capital of <France>?", "Paris."),
        ("p-i00", "instruction", "Write a haiku.", "Waves fold into foam."),
        ("p-c00", "code", "Square a number in Python.", "def sq(x): return x * x"),
        ("p-m00", "arithmetic", "17 + 25?", "42"),
    ]
    data = [
        (rid, m, pid, kind, q, pre, "Velmora waves." if (m, pid) == ("memit", "p-i00") else pre)
        for rid in request_ids
        for m in methods
        for pid, kind, q, pre in prompts
    ]
    columns = ["id", "method", "prompt_id", "prompt_kind", "question", "pre", "output"]
    return pd.DataFrame(data, columns=columns).assign(kind="unrelated")


def blocks(df):
    return re.findall(r"<section class='case-study'>.*?</section>", case_study_html(df))


def test_unrelated_prompts_rule_first_prompt_of_each_of_the_first_three_kinds():
    assert unrelated_prompts(unrelated()) == ["p-q00", "p-i00", "p-c00"]
    two_kinds = unrelated()[lambda d: d["prompt_kind"].isin(["question", "arithmetic"])]
    assert unrelated_prompts(two_kinds) == ["p-q00", "p-q01", "p-m00"]  # filled in file order
    assert unrelated_prompts(unrelated()[lambda d: d["prompt_id"] == "p-c00"]) == ["p-c00"]


def test_unrelated_prompts_answered_before_and_after_each_edit():
    first, second = blocks(pd.concat([rows(), unrelated()]))
    table = first[first.index("<table class='text unrelated'>") :]
    assert re.findall(r"<th>(.*?)</th>", table) == ["unrelated prompt", "unedited", "memit", "muke-memit"]
    assert table.count("<tr>") == 4  # the head and three prompts
    assert "<i>question</i>: Which planet is red?" in table and "Capital of" not in table
    assert "<i>instruction</i>: Write a haiku." in table and "<i>code</i>: Square" in table
    assert "17 + 25?" not in table
    assert "<td>Waves fold into foam.</td>" in table  # the unedited answer
    assert "<mark class='diverge'>Velmora waves.</mark><div class='caption'><b>changed</b>" in table
    assert table.count("unchanged") == 5 and table.count("<b>changed</b>") == 1
    assert "not measured for this request" in second and "unrelated prompt" not in second


def test_unrelated_changed_answers_mark_from_the_first_differing_character_and_escape():
    df = unrelated(methods=("memit",)).assign(output=lambda d: d["pre"].str.replace(".", "! <b>", regex=False))
    table = blocks(pd.concat([rows(), df]))[0]
    assert "<td>Mars<mark class='diverge'>! &lt;b&gt;</mark>" in table and "first 4 characters kept" in table
    assert "<b>bold" not in table
    assert table.count("<td>not measured</td>") == 3  # muke-memit has no retention answers


def test_without_unrelated_rows_blocks_have_no_unrelated_part():
    assert "unrelated" not in case_study_html(rows()) and "not measured" not in case_study_html(rows())


def test_the_retention_answers_file_name_is_the_locality_stage_s():
    from muke.eval.tables import RETENTION_ANSWERS
    from muke.workflow.stages import locality

    assert RETENTION_ANSWERS == locality.RETENTION_ANSWERS


def test_case_rows_add_the_edited_models_retention_answers(tmp_path):
    """tables.case_rows: the question answers, then each edited model's retention answers (the file beside
    its locality output); the pre-edit run's own (request_id null) are left out."""
    from muke.eval import tables

    def run(method, state, request_ids):
        folder = tmp_path / method
        folder.mkdir()
        answers = [
            dict(model_state=state, request_id=rid, id="p-q00", kind="question", question="Q?", pre="a", post="b")
            for rid in request_ids
        ]
        pd.DataFrame(answers).to_parquet(folder / tables.RETENTION_ANSWERS)
        samples = pd.DataFrame([dict(id="r1", kind="question", index=0, output=f"{method} out", target="t")])
        samples.to_parquet(folder / "samples.parquet")
        labels = dict(model="m", dataset="d", method=method, setting="", sweep_param=None, sweep_value=None)
        files = {"samples": str(folder / "samples.parquet"), "locality": str(folder / "locality.parquet")}
        return {**labels, "files": files}

    runs = [run("pre-edit", "pre-edit", [None]), run("memit", "edited", ["r1", "r2"])]
    data = tmp_path / "edits.jsonl"
    data.write_text('{"id": "r1", "question": "Who?", "answer": "t"}\n')
    rows = tables.case_rows(runs, {"d": {"path": str(data), "format": "jsonl"}})
    extra = rows[rows["kind"] == "unrelated"]
    assert len(rows) == 4 and list(extra["id"]) == ["r1", "r2"] and set(extra["method"]) == {"memit"}
    assert list(extra.iloc[0][["prompt_id", "prompt_kind", "question", "pre", "output"]]) == [
        "p-q00",
        "question",
        "Q?",
        "a",
        "b",
    ]
    html_out = case_study_html(rows)
    assert "<table class='text unrelated'>" in html_out and html_out.count("<section") == 1
