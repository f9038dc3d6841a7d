"""Intervals in the score summary, the edit tables and their caption; the case-study section."""

import re

import numpy as np
import pandas as pd

from muke.eval import tables
from muke.eval.intervals import with_intervals
from muke.eval.report import NBSP, build_report
from muke.io import write_parquet
from muke.workflow.stages.score import METRICS, _summary


def _scored(n_requests: int = 6) -> pd.DataFrame:
    """Per-answer scores as the score stage writes them: 1 question and 3 sub-questions per request, 2 families."""
    rng = np.random.default_rng(0)
    rows = [
        dict(
            id=f"r{i}",
            kind=kind,
            index=k,
            family=family,
            edit_failed=i == 0,
            **{m: float(rng.uniform(0, 100)) for m in METRICS},
        )
        for family in ("paper", "standard")
        for i in range(n_requests)
        for kind, n in (("question", 1), ("sub_questions", 3))
        for k in range(n)
    ]
    return pd.DataFrame(rows)


def test_summary_has_intervals_that_bracket_the_mean():
    scored = _scored()
    summary = _summary(scored)
    assert summary[["kind", "family"]].values.tolist() == [
        ["question", "paper"],
        ["sub_questions", "paper"],
        ["question", "standard"],
        ["sub_questions", "standard"],
    ]
    assert (summary["n"] == 6).all() and summary["n_samples"].tolist() == [6, 18, 6, 18]
    assert (summary["edit_failed"] == [1, 3, 1, 3]).all()
    for m in METRICS:
        assert (summary[f"{m}_ci_low"] < summary[m]).all() and (summary[m] < summary[f"{m}_ci_high"]).all()
    # the mean over requests of each request's mean, and the interval resamples requests
    sub = scored[(scored.kind == "sub_questions") & (scored.family == "paper")]
    per_request = sub.groupby("id")["bleu"].mean()
    row = summary[(summary.kind == "sub_questions") & (summary.family == "paper")].iloc[0]
    assert np.isclose(row["bleu"], per_request.mean())
    expected = with_intervals(per_request.reset_index(), [], ["bleu"]).iloc[0]
    assert np.allclose(
        row[["bleu_ci_low", "bleu_ci_high"]].astype(float), expected[["bleu_ci_low", "bleu_ci_high"]].astype(float)
    )


def _runs(tmp_path, summaries: dict, samples: dict | None = None) -> list[dict]:
    runs = []
    for name, summary in summaries.items():
        folder = tmp_path / name
        write_parquet(summary, folder / "summary.parquet")
        files = {"summary": str(folder / "summary.parquet"), "samples": None, "locality": None, "shards": []}
        if samples is not None:
            write_parquet(samples[name], folder / "samples.parquet")
            files["samples"] = str(folder / "samples.parquet")
        method, _, setting = name.partition("@")
        runs.append(
            dict(
                model="tiny",
                dataset="demo",
                method=method,
                setting=setting,
                sweep_param=None,
                sweep_value=None,
                files=files,
                identities={},
            )
        )
    return runs


def test_edit_metrics_table_carries_the_intervals(tmp_path):
    new = _summary(_scored())
    old = new.drop(columns=tables.INTERVAL_COLUMNS)  # a summary written before intervals existed
    edit = tables.edit_metrics(_runs(tmp_path, {"pre-edit": old, "muke-memit": new}))
    assert list(edit.columns) == tables.LABELS + tables.EDIT_COLUMNS
    assert set(tables.INTERVAL_COLUMNS) <= set(edit.columns)
    assert edit.loc[edit.method == "pre-edit", tables.INTERVAL_COLUMNS].isna().all().all()
    assert edit.loc[edit.method == "muke-memit", tables.INTERVAL_COLUMNS].notna().all().all()


def _edit(methods: dict) -> pd.DataFrame:
    """Paper-family question rows; methods: {name: (bleu, low, high)}; the other metrics without intervals."""
    return pd.DataFrame(
        [
            dict(
                model="tiny",
                dataset="demo",
                method=name,
                setting="",
                kind="question",
                family="paper",
                bleu=mean,
                bleu_ci_low=low,
                bleu_ci_high=high,
                rouge_l=50.0,
                bertscore=60.0,
                n=8,
            )
            for name, (mean, low, high) in methods.items()
        ]
    )


def _cells(text: str) -> dict:
    """{row label: its cells} of the paper-family table."""
    table = text[text.index("<h3>paper family</h3>") : text.index("id='integrity'")]
    rows = [
        (re.findall(r"<th[^>]*>(.*?)</th>", row), re.findall(r"<td>(.*?)</td>", row, re.S))
        for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)
    ]
    return {heads[-1]: cells for heads, cells in rows if cells}


def test_cells_show_intervals_and_mark_only_separated_orderings(tmp_path):
    edit = _edit(
        {
            "pre-edit": (20.0, 15.0, 25.0),
            "muke-memit": (40.0, 30.0, 50.0),
            "memit": (24.0, 18.0, 30.0),
            "bad": (5.0, 1.0, 9.5),
        }
    )
    text = build_report(edit, None, tmp_path, config={}, stage_identities={}).read_text()
    cells = {label: [c.replace(NBSP, "_") for c in row] for label, row in _cells(text).items()}
    assert cells["pre-edit"][0] == "20.00 [15.00,_25.00]"
    assert cells["muke-memit"][0] == "40.00_▲ [30.00,_50.00]"  # wholly above pre-edit's
    assert cells["memit"][0] == "24.00 [18.00,_30.00]"  # overlaps: no ordering claimed
    assert cells["bad"][0] == "5.00_▼ [1.00,_9.50]"
    assert all(c[1:] == ["60.00", "50.00"] for c in cells.values())  # no interval, no mark
    caption = text[text.index("id='edit'") : text.index("<h3>")]
    assert "95% percentile-bootstrap interval over requests" in caption and "2000 resamples, seed 0" in caption
    assert "only where their intervals do not overlap" in caption and "▲ / ▼" in caption
    csv = pd.read_csv(tmp_path / "edit_metrics_paper.csv")
    assert csv["Ori BLEU"].str.replace(NBSP, "_").tolist() == [
        cells[m][0] for m in ("pre-edit", "muke-memit", "memit", "bad")
    ]


def test_no_interval_sentence_without_intervals(tmp_path):
    edit = _edit({"pre-edit": (20.0, None, None), "memit": (40.0, None, None)})
    text = build_report(edit, None, tmp_path, config={}, stage_identities={}).read_text()
    assert "bootstrap" not in text and "▲" not in text and _cells(text)["memit"][0] == "40.00"


def test_sweep_table_shows_intervals(tmp_path):
    edit = pd.concat(
        [_edit({"pre-edit": (20.0, 15.0, 25.0)})]
        + [
            _edit({"muke-memit": (20.0 + 10 * v, 15.0 + 10 * v, 25.0 + 10 * v)}).assign(
                setting=f'{{"v_lr": {v}}}', sweep_param="v_lr", sweep_value=str(v)
            )
            for v in (0, 2)
        ]
    )
    text = build_report(edit, None, tmp_path, config={}, stage_identities={}).read_text()
    sweep = text[text.index("<h3>Sweep over v_lr</h3>") : text.index("id='integrity'")]
    assert "v_lr=0" in sweep and "v_lr=2" in sweep
    assert f"20.00 [15.00,{NBSP}25.00]<" in sweep and f"40.00{NBSP}▲ [35.00,{NBSP}45.00]<" in sweep  # vs pre-edit


def _samples(outputs: list[str]) -> pd.DataFrame:
    """Scored rows of a run (two families): a question and a sub-question per request."""
    return pd.DataFrame(
        [
            dict(
                id=f"r{i}",
                kind=kind,
                index=0,
                family=family,
                output=f"{out} ({kind})",
                target=f"Answer {i}.",
                bleu=1.0,
                rouge_l=1.0,
                bertscore=1.0,
            )
            for family in ("paper", "standard")
            for i, out in enumerate(outputs)
            for kind in ("question", "sub_questions")
        ]
    )


def test_case_study_lists_each_request_once_with_a_column_per_run(tmp_path):
    data = tmp_path / "edits.jsonl"
    data.write_text(
        "".join(f'{{"id": "r{i}", "question": "Question {i}?", "answer": "Answer {i}."}}\n' for i in range(10))
    )
    summary = _summary(_scored())
    names = ['muke-memit@{"v_lr": 0.5}', "pre-edit", 'muke-memit@{"v_lr": 1.0}']
    outputs = {n: [f"{n} says {i}" for i in range(10)] for n in names}
    runs = _runs(tmp_path, dict.fromkeys(names, summary), {n: _samples(outputs[n]) for n in names})
    rows = tables.case_rows(runs, {"demo": {"path": str(data), "format": "jsonl"}})
    assert len(rows) == 3 * 10 and set(rows["kind"]) == {"question"}
    text = build_report(
        tables.edit_metrics(runs), None, tmp_path / "out", config={}, stage_identities={}, case_rows=rows
    ).read_text()
    section = text[text.index("id='case-study'") : text.index("id='locality'")]
    blocks = re.findall(r"<section class='case-study'>.*?</section>", section, re.S)
    assert [re.search(r"<h3>(.*?)</h3>", b).group(1) for b in blocks] == [f"r{i}" for i in range(8)]
    assert "first 8 of 10 requests" in section and "<p><b>Question:</b> Question 3?</p>" in blocks[3]
    heads = re.findall(r"<th>(.*?)</th>", blocks[0])
    assert heads == [
        "target",
        "pre-edit",
        "muke-memit · {&quot;v_lr&quot;: 0.5}",
        "muke-memit · {&quot;v_lr&quot;: 1.0}",
    ]
    assert "pre-edit says 0 (question)" in blocks[0] and "(sub_questions)" not in section
    assert "<a href='#case-study'>" in text and "mark.diverge{" in text
