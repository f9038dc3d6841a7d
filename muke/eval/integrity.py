"""The report's Integrity view: per run, what the edit did beside what else it changed.

One row per run (model × dataset × method × setting), the unedited model ("pre-edit") first:

- efficacy of one metric family (the paper's where present): question BLEU, paraphrase BLEU and
  sub-question ROUGE-L (the paper's sub-question measure), the latter two beside the unedited model's
  of the same model and dataset, "value ▼ (unedited)" where the mean lies below it;
- fluency: the answers' repetition rate beside their targets' (muke.eval.fluency), on the questions;
- locality (muke.eval.retention, the mean over edited models): first-token agreement and KL on the
  unrelated prompts, exact match of the answers' first tokens, and every lm-eval task's metrics (×100).

Below it the efficacy–integrity frontier (`frontier_points`, muke.eval.plots.plot_frontier): question BLEU
against first-token agreement per edited run, the Pareto-optimal runs marked.

The 64-token answer BLEU of the unrelated prompts stays in the Locality table: a random update of the
same norm already scores 57–66 on it, so it is no target.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from muke.eval.case_study import PRE_EDIT
from muke.eval.page import esc, fmt, note, table
from muke.eval.plots import frontier_figure

ANCHOR = "integrity"
KEYS = ["model", "dataset", "method", "setting", "v_num_grad_steps", "sweep_param", "sweep_value"]
NBSP = "\u00a0"
# (kind, metric, column, beside the unedited model's)
EFFICACY = [
    ("question", "bleu", "question BLEU", False),
    ("para_question", "bleu", "paraphrase BLEU", True),
    ("sub_questions", "rouge_l", "sub-question ROUGE-L", True),
]
BESIDE = {label for *_, label, beside in EFFICACY if beside}
REPETITION = "repetition (target)"
REPETITION_VALUES = ("repetition", "target_repetition")  # the answers' and targets', shown as REPETITION
REPETITION_CAPTION = (
    "Repetition (target): the share of the answers' word 3-grams that repeat an earlier one, beside the "
    "targets' own (0: never repeats; → 1: a loop such as “daboatschu.daboatschu…”)."
)
# (task, metric, column, scale) of muke.eval.retention's rows
RETENTION = [
    ("retention", "first_token_agreement", "first-token agreement", 100),
    ("text_shift", "first_token_kl", "first-token KL", 1),
    ("retention", "prefix_exact_match", "prefix exact match", 100),
]
OWN_TASKS = {"retention", "text_shift"}
FRONTIER = {"question BLEU": "question_bleu", "first-token agreement": "first_token_agreement"}  # its axes
CAPTION = (
    "Per run, the edit's efficacy beside what else it changed. Efficacy ×100 against the target ({family} "
    "family); paraphrase and sub-question scores read “value ▼ (unedited)”: the unedited model's mean of the "
    "same model and dataset in brackets, ▼ where the run's mean lies below it (means only: the Edit metrics "
    "table marks only separated intervals). Repetition (target): the share of the question answers' word "
    "3-grams that repeat an earlier one, beside the targets' own (a looping answer → 1). First-token "
    "agreement (% of unrelated chat prompts whose first answer token is the unedited model's top-1) and "
    "first-token KL (nats) at the prompt's last token; prefix exact match: % of answers whose first tokens "
    "(locality.retention.prefix_tokens) are the unedited model's; lm-eval tasks ×100. Locality values of "
    "edited runs are means over the edited models. The greedy answer BLEU of the Locality table is no "
    "target: a random update of the same norm already scores 57–66 on it."
)


def _text(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """`keys` as text, empty for missing, so that frames of different origins join on them."""
    return df.assign(**{c: df[c].fillna("").astype(str) for c in keys})


def _pre_edit_values(runs: pd.DataFrame, keys: list[str], value: str) -> pd.Series:
    """Per run, `value` of the unedited run of its model and dataset (with the same labels but the method
    where there is one, as under a generation sweep)."""
    pre = runs[runs["method"] == PRE_EDIT]
    base = [c for c in ("model", "dataset") if c in keys]
    found = [
        runs[on].merge(pre[on + [value]].drop_duplicates(on), on=on, how="left")[value]
        for on in ([k for k in keys if k != "method"], base)
    ]
    return found[0].fillna(found[1]).set_axis(runs.index)


def _own(rows: pd.DataFrame, runs: pd.DataFrame, on: list[str], value: str) -> pd.Series:
    """Per run, `value` of its row of `rows` (joined on `on`); NaN where it has none."""
    return runs.merge(rows[on + [value]].drop_duplicates(on), on=on, how="left")[value].set_axis(runs.index)


def _cells(v: pd.DataFrame, keys: list[str], label: str) -> list[str | None]:
    """The table cells of column `label` of `v` (`_values`); EFFICACY's beside ones read 'mean ▼ (unedited)'."""
    if label not in BESIDE:
        return [None if pd.isna(x) else fmt(x) for x in v[label]]
    ref = _pre_edit_values(v, keys, label)
    return [_beside(x, r, m == PRE_EDIT) for x, r, m in zip(v[label], ref, v["method"])]


def _beside(value, ref, unedited: bool) -> str | None:
    """'value ▼ (ref)': ▼ where value < ref; the unedited run's own value alone."""
    if pd.isna(value):
        return None
    if unedited or pd.isna(ref):
        return fmt(value)
    return fmt(value) + (NBSP + "▼" if value < ref else "") + f" ({fmt(ref)})"


def repetition_cells(df: pd.DataFrame) -> list[str | None] | None:
    """Per row of `df`, 'answers' (targets')' repetition rate; None where `df` has no fluency columns
    (a summary written before them)."""
    if not {"repetition", "target_repetition"} <= set(df) or df["repetition"].isna().all():
        return None
    return [None if pd.isna(a) else f"{fmt(a)} ({fmt(t)})" for a, t in zip(df["repetition"], df["target_repetition"])]


def _locality_values(loc: pd.DataFrame, runs: pd.DataFrame, keys: list[str]) -> dict:
    """The retention columns, then every lm-eval task × metric (×100), of each run's model state."""
    on = [c for c in keys if c in loc]
    loc = _text(loc, on)
    if "model_state" in loc and "method" in loc:
        loc = loc[(loc["method"] == PRE_EDIT) == (loc["model_state"] == PRE_EDIT)]
    lm_eval = loc.loc[~loc["task"].isin(OWN_TASKS), ["task", "metric"]].drop_duplicates()
    wanted = RETENTION + [(t, m, f"{t} {m}", 100) for t, m in lm_eval.itertuples(index=False)]
    columns = {}
    for task, metric, label, scale in wanted:
        rows = loc[(loc["task"] == task) & (loc["metric"] == metric)]
        if len(rows):
            columns[label] = scale * _own(rows, runs, on, "value")
    return columns


def _family(edit: pd.DataFrame) -> str:
    return "paper" if "paper" in set(edit["family"]) else edit["family"].iloc[0]


def _values(edit: pd.DataFrame, loc: pd.DataFrame | None) -> tuple[pd.DataFrame, list[str]]:
    """The numbers behind the Integrity table, and its keys: per run (pre-edit first) the keys as text, then
    each column that has values as shown (efficacy of `_family`, locality scaled), REPETITION as its two
    REPETITION_VALUES."""
    keys = [c for c in KEYS if c in edit and edit[c].notna().any() and edit[c].astype(str).ne("").any()]
    d = _text(edit[edit["family"] == _family(edit)], keys)
    runs = d[keys].drop_duplicates()
    runs = runs.assign(_k=runs["method"].ne(PRE_EDIT)).sort_values("_k", kind="stable").drop(columns="_k")
    runs = runs.reset_index(drop=True)
    columns = {}
    for kind, metric, label, _ in EFFICACY:
        rows = d[d["kind"] == kind]
        if metric in rows and rows[metric].notna().any():
            columns[label] = _own(rows, runs, keys, metric)
    questions = d[d["kind"] == "question"]
    columns.update({c: _own(questions, runs, keys, c) for c in REPETITION_VALUES if c in questions})
    if loc is not None and len(loc):
        columns.update(_locality_values(loc, runs, keys))
    return runs.assign(**columns), keys


def integrity_table(edit: pd.DataFrame, loc: pd.DataFrame | None) -> pd.DataFrame:
    """The Integrity view: one row per run of the edit metrics (pre-edit first), the columns of the
    module docstring that have values."""
    v, keys = _values(edit, loc)
    columns = {}
    for label in v.columns.drop(keys):
        if label == "repetition":
            columns[REPETITION] = repetition_cells(v)
        elif label not in REPETITION_VALUES:
            columns[label] = _cells(v, keys, label)
    shown = {label: values for label, values in columns.items() if values is not None}
    return v[keys].assign(**shown).set_index(keys).fillna("—")


def _run_label(run: dict, varying: list[str]) -> str:
    """A run's name: the varying model / dataset, its method, setting, else swept value, and step count."""
    parts = [run[c] for c in varying] + [run["method"], run.get("setting", "")]
    if not run.get("setting") and run.get("sweep_value"):
        parts.append(f"{run.get('sweep_param') or 'sweep'}={run['sweep_value']}")
    if run.get("v_num_grad_steps"):
        parts.append(f"v_num_grad_steps={run['v_num_grad_steps']}")
    return " · ".join(p for p in parts if p)


def _pareto(xy: np.ndarray) -> np.ndarray:
    """Per row of `xy`, whether no other row is ≥ on every column and > on one."""
    at_least = (xy[None, :, :] >= xy[:, None, :]).all(axis=2)
    above = (xy[None, :, :] > xy[:, None, :]).any(axis=2)
    return ~(at_least & above).any(axis=1)


def frontier_points(edit: pd.DataFrame, loc: pd.DataFrame | None) -> pd.DataFrame:
    """Per edited run with a question BLEU and a first-token agreement: its `run` name, both (as the
    Integrity table shows them: ×100, %), the answers' and targets' repetition rates (NaN where not
    measured) and `pareto`: no other run is at least as good on both and better on one."""
    v, keys = _values(edit, loc)
    v = v.rename(columns=FRONTIER).reindex(columns=[*keys, *FRONTIER.values(), *REPETITION_VALUES])
    v = v[v["method"].ne(PRE_EDIT)].dropna(subset=list(FRONTIER.values())).reset_index(drop=True)
    varying = [c for c in ("model", "dataset") if c in keys and v[c].nunique() > 1]
    points = v.drop(columns=keys).astype(float)
    points.insert(0, "run", [_run_label(run, varying) for run in v[keys].to_dict("records")])
    return points.assign(pareto=_pareto(points[list(FRONTIER.values())].to_numpy()))


def section(edit: pd.DataFrame | None, loc: pd.DataFrame | None) -> tuple[list[str], dict]:
    """The report's Integrity section: its table, then the efficacy–integrity frontier where ≥ 2 runs have
    both axes; and its tables ({"integrity": …, "frontier": … where it has points}; {} without edit metrics)."""
    parts = [f"<h2 id='{ANCHOR}'>Integrity</h2>"]
    if edit is None or not len(edit):
        return parts + [note("No edit metrics.")], {}
    t, points = integrity_table(edit, loc), frontier_points(edit, loc)
    parts += [f"<p class='caption'>{esc(CAPTION.format(family=_family(edit)))}</p>", table(t)]
    return parts + frontier_figure(points), {"integrity": t} | ({"frontier": points} if len(points) else {})
