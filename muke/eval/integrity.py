"""The report's Integrity view: per run, what the edit did beside what else it changed.

One row per run (model × dataset × method × setting), the unedited model ("pre-edit") first:

- efficacy of one metric family (the paper's where present): question BLEU, paraphrase BLEU and
  sub-question ROUGE-L (the paper's sub-question measure), the latter two beside the unedited model's
  of the same model and dataset, "value ▼ (unedited)" where the mean lies below it;
- fluency: the answers' repetition rate beside their targets' (muke.eval.fluency), on the questions;
- locality (muke.eval.retention, the mean over edited models): first-token agreement and KL on the
  unrelated prompts, exact match of the answers' first tokens, and every lm-eval task's metrics (×100).

The 64-token answer BLEU of the unrelated prompts stays in the Locality table: a random update of the
same norm already scores 57–66 on it, so it is no target.
"""

from __future__ import annotations

import pandas as pd

from muke.eval.case_study import PRE_EDIT
from muke.eval.page import esc, fmt, note, table

ANCHOR = "integrity"
KEYS = ["model", "dataset", "method", "setting", "v_num_grad_steps", "sweep_param", "sweep_value"]
NBSP = "\u00a0"
# (kind, metric, column, beside the unedited model's)
EFFICACY = [
    ("question", "bleu", "question BLEU", False),
    ("para_question", "bleu", "paraphrase BLEU", True),
    ("sub_questions", "rouge_l", "sub-question ROUGE-L", True),
]
REPETITION = "repetition (target)"
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


def _pre_edit_values(d: pd.DataFrame, runs: pd.DataFrame, keys: list[str], value: str) -> pd.Series:
    """Per run, `value` of the unedited run of its model and dataset (with the same labels but the method
    where there is one, as under a generation sweep)."""
    pre = d[d["method"] == PRE_EDIT]
    base = [c for c in ("model", "dataset") if c in keys]
    found = [
        runs[on].merge(pre[on + [value]].drop_duplicates(on), on=on, how="left")[value]
        for on in ([k for k in keys if k != "method"], base)
    ]
    return found[0].fillna(found[1]).set_axis(runs.index)


def _efficacy(d: pd.DataFrame, runs: pd.DataFrame, keys: list[str], kind: str, metric: str, beside: bool):
    """One efficacy column: the run's mean, and where `beside`, 'mean ▼ (unedited)'."""
    rows = d[d["kind"] == kind]
    if metric not in rows or rows[metric].isna().all():
        return None
    own = runs.merge(rows[keys + [metric]].drop_duplicates(keys), on=keys, how="left")[metric].set_axis(runs.index)
    if not beside:
        return own.map(lambda v: None if pd.isna(v) else fmt(v))
    ref = _pre_edit_values(rows, runs, keys, metric)
    return pd.Series([_beside(v, r, m == PRE_EDIT) for v, r, m in zip(own, ref, runs["method"])], index=runs.index)


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


def _repetition(d: pd.DataFrame, runs: pd.DataFrame, keys: list[str]):
    """The repetition cells of each run's question answers; None without fluency columns."""
    rows = d[d["kind"] == "question"]
    cols = [c for c in ("repetition", "target_repetition") if c in rows]
    return repetition_cells(runs.merge(rows[keys + cols].drop_duplicates(keys), on=keys, how="left"))


def _locality_columns(loc: pd.DataFrame, runs: pd.DataFrame, keys: list[str]) -> dict:
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
            found = runs.merge(rows[on + ["value"]].drop_duplicates(on), on=on, how="left")["value"]
            columns[label] = [None if pd.isna(v) else fmt(scale * v) for v in found]
    return columns


def _family(edit: pd.DataFrame) -> str:
    return "paper" if "paper" in set(edit["family"]) else edit["family"].iloc[0]


def integrity_table(edit: pd.DataFrame, loc: pd.DataFrame | None) -> pd.DataFrame:
    """The Integrity view: one row per run of the edit metrics (pre-edit first), the columns of the
    module docstring that have values."""
    family = _family(edit)
    keys = [c for c in KEYS if c in edit and edit[c].notna().any() and edit[c].astype(str).ne("").any()]
    d = _text(edit[edit["family"] == family], keys)
    runs = d[keys].drop_duplicates()
    runs = runs.assign(_k=runs["method"].ne(PRE_EDIT)).sort_values("_k", kind="stable").drop(columns="_k")
    runs = runs.reset_index(drop=True)
    columns = {label: _efficacy(d, runs, keys, kind, metric, beside) for kind, metric, label, beside in EFFICACY}
    columns[REPETITION] = _repetition(d, runs, keys)
    if loc is not None and len(loc):
        columns.update(_locality_columns(loc, runs, keys))
    shown = {label: values for label, values in columns.items() if values is not None}
    return runs.assign(**shown).set_index(keys).fillna("—")


def section(edit: pd.DataFrame | None, loc: pd.DataFrame | None) -> tuple[list[str], dict]:
    """The report's Integrity section and its table ({"integrity": …}; {} without edit metrics)."""
    parts = [f"<h2 id='{ANCHOR}'>Integrity</h2>"]
    if edit is None or not len(edit):
        return parts + [note("No edit metrics.")], {}
    t = integrity_table(edit, loc)
    return parts + [f"<p class='caption'>{esc(CAPTION.format(family=_family(edit)))}</p>", table(t)], {"integrity": t}
