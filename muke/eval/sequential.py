"""The report's sequential-editing section (editing.mode sequential): how the first edits hold up and how
locality decays as more edits are made.

Each checkpoint run is labelled with its setting {"n_edits": n} and scored on the requests edited so far.
- retention curve: the mean metric over the first k requests (k a checkpoint) at every checkpoint n ≥ k;
- locality curve: every locality metric at each checkpoint, the unedited model at n = 0.
"""

from __future__ import annotations

import json

import pandas as pd

from muke.eval.page import fmt, table
from muke.eval.plots import _figure, _subplots, series

CURVE_METRICS = {"bleu": "BLEU", "rouge_l": "ROUGE-L"}  # paper family, original question
PRE_EDIT = "pre-edit"
ANCHOR = "sequential"


def n_edits(df: pd.DataFrame) -> pd.Series:
    """The checkpoint of each row (its setting's n_edits), NaN for runs that are not sequential."""
    setting = df["setting"] if "setting" in df else pd.Series("", index=df.index)
    return setting.map(lambda s: json.loads(s).get("n_edits") if isinstance(s, str) and s else None).astype(float)


def _sequential(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """The rows of sequential runs with their checkpoint `n_edits` and `series` (method + other varying labels)."""
    if df is None or "setting" not in df:
        return None
    d = df.assign(n_edits=n_edits(df)).dropna(subset=["n_edits"])
    if not len(d):
        return None
    d = d.assign(n_edits=d["n_edits"].astype(int))
    return d.assign(series=series(d.assign(setting=d["setting"].map(_without_n_edits))))


def _without_n_edits(setting: str) -> str:
    rest = {k: v for k, v in json.loads(setting).items() if k != "n_edits"}
    return json.dumps(rest, sort_keys=True) if rest else ""


def retention_curve(per_sample: pd.DataFrame | None) -> pd.DataFrame | None:
    """Rows (series, first_k, n_edits, metric, value, n): the mean over the first k edited requests (the
    requests of checkpoint k) of each metric at checkpoint n ≥ k; paper family, original questions."""
    d = _sequential(per_sample)
    if d is None:
        return None
    d = d[(d["family"] == "paper") & (d["kind"] == "question")]
    rows = []
    for name, sub in d.groupby("series", sort=False):
        checkpoints = sorted(sub["n_edits"].unique())
        first = {k: set(sub.loc[sub["n_edits"] == k, "id"]) for k in checkpoints}
        for k in checkpoints:
            for n in (n for n in checkpoints if n >= k):
                at = sub[(sub["n_edits"] == n) & sub["id"].isin(first[k])]
                per_request = at.groupby("id")[list(CURVE_METRICS)].mean()
                for metric in CURVE_METRICS:
                    rows.append(
                        {
                            "series": name,
                            "first_k": k,
                            "n_edits": n,
                            "metric": metric,
                            "value": per_request[metric].mean(),
                            "n": len(per_request),
                        }
                    )
    return pd.DataFrame(rows)


def locality_curve(loc: pd.DataFrame | None) -> pd.DataFrame | None:
    """Rows (series, task, metric, n_edits, value, stderr): each sequential run's locality at its
    checkpoint, and the unedited model's of the same model at n_edits 0."""
    d = _sequential(loc)
    if d is None:
        return None
    d = d[d["model_state"] == "edited"]
    pre = loc[loc["model_state"] == PRE_EDIT]
    rows = [d]
    for name, sub in d.groupby("series", sort=False):
        same = pre[pre["model"].isin(sub["model"].unique())] if "model" in pre else pre
        rows.append(same.assign(series=name, n_edits=0))
    out = pd.concat(rows, ignore_index=True)
    return out[["series", "task", "metric", "n_edits", "value", "stderr"]].sort_values(
        ["series", "task", "metric", "n_edits"], kind="stable"
    )


def _retention_table(curve: pd.DataFrame) -> pd.DataFrame:
    d = curve[curve["metric"] == "bleu"].assign(cell=lambda x: x["value"].map(fmt))
    d = d.assign(edits=d["first_k"].map(lambda k: f"first {k}"))
    wide = d.pivot_table(index=["series", "edits"], columns="n_edits", values="cell", aggfunc="first", sort=False)
    wide.columns = [f"after {n}" for n in wide.columns]
    return wide.fillna("—")


def _locality_table(curve: pd.DataFrame) -> pd.DataFrame:
    scale = curve["task"].map(lambda t: 1.0 if t == "text_shift" else 100.0)
    d = curve.assign(cell=(curve["value"] * scale).map(fmt))
    wide = d.pivot_table(index=["series", "task", "metric"], columns="n_edits", values="cell", aggfunc="first")
    wide.columns = [f"after {n}" if n else "unedited" for n in wide.columns]
    return wide.fillna("—")


def plot_retention(curve: pd.DataFrame):
    """One panel per metric: x = edits made, y = mean over the first k edits, a line per series × k."""
    fig, axes = _subplots(len(CURVE_METRICS), width=4.2 * len(CURVE_METRICS))
    for ax, (metric, label) in zip(axes[0], CURVE_METRICS.items()):
        for (name, k), sub in curve[curve["metric"] == metric].groupby(["series", "first_k"], sort=False):
            ax.plot(sub["n_edits"], sub["value"], marker="o", label=f"{name} · first {k}")
        ax.set(xlabel="edits made", ylabel=f"{label} of the first k edits", title=label)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0, -1].legend(fontsize=7)
    return fig


def plot_locality(curve: pd.DataFrame, limit: int = 6):
    """One panel per task/metric (the first `limit`): x = edits made (0 = unedited), a line per series."""
    keys = list(dict.fromkeys(zip(curve["task"], curve["metric"])))[:limit]
    fig, axes = _subplots(len(keys), width=3.6 * len(keys))
    for ax, (task, metric) in zip(axes[0], keys):
        for name, sub in curve[(curve["task"] == task) & (curve["metric"] == metric)].groupby("series", sort=False):
            ax.plot(sub["n_edits"], sub["value"], marker="o", label=str(name))
        ax.set(xlabel="edits made")
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0, -1].legend(fontsize=7)
    return fig


def section(per_sample: pd.DataFrame | None, loc: pd.DataFrame | None) -> tuple[list[str], dict]:
    """(HTML parts, tables) of the sequential-editing section; none without sequential runs."""
    retention, locality = retention_curve(per_sample), locality_curve(loc)
    if retention is None or not len(retention):
        return [], {}
    parts = [f"<h2 id='{ANCHOR}'>Sequential editing</h2>"]
    parts.append(
        "<p class='caption'>The requests edited one batch after another into one model. Retention: char "
        "BLEU ×100 (paper family, original question) of the first k edits, after each number of edits made "
        "(rows: the first k; columns: edits made).</p>"
    )
    tables = {"sequential_retention": _retention_table(retention)}
    parts += [table(tables["sequential_retention"])]
    parts.append(_figure("Retention curve", plot_retention(retention), "Mean over the first k edited requests."))
    if locality is not None and len(locality):
        tables["sequential_locality"] = _locality_table(locality)
        parts += [
            "<p class='caption'>Locality after each number of edits (×100 except text_shift: KL in nats "
            "per token, perplexity); <code>unedited</code>: the pre-edit model.</p>",
            table(tables["sequential_locality"]),
            _figure("Locality curve", plot_locality(locality), "0 edits: the unedited model."),
        ]
    return parts, tables
