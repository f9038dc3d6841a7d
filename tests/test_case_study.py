"""Case study HTML: where answers leave the target, escaping, one block per request, a column per method."""

import re

import pandas as pd
import pytest

from muke.eval.case_study import case_study_html, first_divergence, reproduced


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
