"""The Integrity section's efficacy–integrity frontier: its points, their Pareto flags, the figure and CSV."""

import pandas as pd
import pytest

from muke.eval.integrity import frontier_points, integrity_table
from muke.eval.page import fmt
from muke.eval.report import build_report

# method: (question BLEU, first-token agreement as a fraction, repetition); c and e are dominated (e only
# by ≥ on one axis and > on the other), the rest are not
RUNS = {
    "pre-edit": (5.0, 1.0, 0.0),
    "a": (90.0, 0.50, 0.30),
    "b": (80.0, 0.70, 0.10),
    "c": (70.0, 0.60, 0.20),
    "d": (60.0, 0.90, 0.05),
    "e": (80.0, 0.65, 0.15),
}
PARETO = {"a": True, "b": True, "c": False, "d": True, "e": False}


def _edit(runs: dict = RUNS) -> pd.DataFrame:
    """Per run, question and paraphrase rows of the paper and standard families (as muke.eval.tables)."""
    return pd.DataFrame(
        dict(
            model="m",
            dataset="ds",
            method=method,
            setting="",
            kind=kind,
            family=family,
            bleu=bleu + 1 if kind == "para_question" else bleu - 50 * (family == "standard"),
            rouge_l=bleu,
            repetition=repetition,
            target_repetition=0.02,
        )
        for method, (bleu, _, repetition) in runs.items()
        for kind in ("question", "para_question")
        for family in ("paper", "standard")
    )


def _locality(runs: dict = RUNS) -> pd.DataFrame:
    """muke.eval.retention's first-token rows per model state, as the Locality table reads them."""
    return pd.DataFrame(
        dict(
            model="m",
            method=method,
            model_state="pre-edit" if method == "pre-edit" else "edited",
            task=task,
            metric=metric,
            value=value,
            stderr=None,
        )
        for method, (_, agreement, _) in runs.items()
        for task, metric, value in (
            ("retention", "first_token_agreement", agreement),
            ("text_shift", "first_token_kl", 1 - agreement),
        )
    )


def test_pareto_flags_and_no_pre_edit_point():
    points = frontier_points(_edit(), _locality())
    assert list(points.columns) == [
        "run",
        "question_bleu",
        "first_token_agreement",
        "repetition",
        "target_repetition",
        "pareto",
    ]
    assert dict(zip(points["run"], points["pareto"])) == PARETO
    assert "pre-edit" not in set(points["run"])
    a = points.set_index("run").loc["a"]
    assert (a["question_bleu"], a["first_token_agreement"], a["repetition"]) == pytest.approx((90.0, 50.0, 0.3))


def test_equal_points_do_not_dominate_each_other():
    runs = {"a": (50.0, 0.5, 0.1), "b": (50.0, 0.5, 0.1)}
    points = frontier_points(_edit(runs), _locality(runs))
    assert points["pareto"].tolist() == [True, True]


def test_points_hold_the_integrity_tables_numbers():
    edit, loc = _edit(), _locality()
    table = integrity_table(edit, loc).xs(("m", "ds"), level=["model", "dataset"])
    points = frontier_points(edit, loc).set_index("run")
    assert len(points) == len(table) - 1
    for run, p in points.iterrows():
        assert table.loc[run, "question BLEU"] == fmt(p["question_bleu"])
        assert table.loc[run, "first-token agreement"] == fmt(p["first_token_agreement"])
        assert table.loc[run, "repetition (target)"] == f"{fmt(p['repetition'])} ({fmt(p['target_repetition'])})"


def test_runs_without_an_axis_are_left_out_and_named_by_their_sweep():
    edit = _edit().assign(sweep_param="v_lr", sweep_value=lambda d: d["method"].map({"a": "0.1", "b": "0.5"}))
    loc = _locality()
    points = frontier_points(edit[edit["method"].isin(["pre-edit", "a", "b"])], loc[loc["method"] != "b"])
    assert points["run"].tolist() == ["a · v_lr=0.1"]
    assert frontier_points(_edit().drop(columns=["repetition", "target_repetition"]), None).empty
    no_fluency = frontier_points(_edit().drop(columns=["repetition", "target_repetition"]), loc)
    assert len(no_fluency) == 5 and no_fluency["repetition"].isna().all()


def _integrity(html: str) -> str:
    return html[html.index("id='integrity'") : html.index("id='case-study'")]


def test_report_shows_the_frontier_and_writes_its_csv(tmp_path):
    html = build_report(_edit(), _locality(), tmp_path).read_text()
    view = _integrity(html)
    assert "Efficacy–integrity frontier" in view and "<img" in view
    assert view.index("<table") < view.index("<img")
    csv = pd.read_csv(tmp_path / "frontier.csv")
    assert dict(zip(csv["run"], csv["pareto"])) == PARETO
    assert csv.set_index("run").loc["b", "first_token_agreement"] == pytest.approx(70.0)


def test_no_frontier_for_fewer_than_two_points(tmp_path):
    runs = {m: RUNS[m] for m in ("pre-edit", "a")}
    html = build_report(_edit(runs), _locality(runs), tmp_path / "one").read_text()
    assert "Efficacy–integrity frontier" not in html and "<img" not in _integrity(html)
    assert len(pd.read_csv(tmp_path / "one" / "frontier.csv")) == 1
    build_report(_edit(), None, tmp_path / "none")
    assert not (tmp_path / "none" / "frontier.csv").exists()


def test_pareto_runs_are_numbered_on_the_plot_and_named_in_its_key():
    """Runs a few points apart would print their names over each other: the dots get numbers, the key names."""
    from muke.eval.plots import plot_frontier

    close = {**RUNS, "b": (89.0, 0.52, 0.10)}
    points = frontier_points(_edit(close), _locality(close))
    ax = plot_frontier(points).axes[0]
    front = points[points["pareto"]].sort_values("question_bleu")
    assert [t.get_text() for t in ax.texts] == [str(k) for k in range(1, len(front) + 1)]
    key = [t.get_text() for t in ax.get_legend().get_texts()]
    assert key == [f"{k}: {name}" for k, name in enumerate(front["run"], 1)]
    assert [t.xy for t in ax.texts] == list(zip(front["question_bleu"], front["first_token_agreement"]))
