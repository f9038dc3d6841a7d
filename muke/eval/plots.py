"""The report's figures (paper Fig. 4 per category, Fig. 5 BLEU vs target length, Fig. 6 metric vs swept
value, δ-loss traces, the Integrity section's efficacy–integrity frontier) as inline base64 PNG, each with
a note where its data is missing."""

from __future__ import annotations

import base64
import io

import pandas as pd

from muke.eval.page import LABELS, METRICS, esc, note, sorted_values

FRONTIER_TITLE = "Efficacy–integrity frontier"
FRONTIER_CAPTION = (
    "One point per edited run: x, its question BLEU (×100, the Integrity table's family); y, its first-token "
    "agreement (% of unrelated chat prompts whose first answer token is the unedited model's top-1; the "
    "unedited model scores 100 by definition and is not drawn). Colour: the repetition rate of the question "
    "answers (share of word 3-grams repeating an earlier one; grey where not measured). The upper right is "
    "better; the named points on the step line are not dominated: no other run is at least as good on both "
    "axes and better on one."
)


def _png(fig) -> str:
    """A matplotlib figure as a base64 PNG string (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(title: str, fig, caption: str) -> str:
    return (
        f"<figure><img alt='{esc(title)}' src='data:image/png;base64,{_png(fig)}'>"
        f"<figcaption><b>{esc(title)}.</b> {esc(caption)}</figcaption></figure>"
    )


def _paper_questions(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of the paper family and the original question, where the frame says which."""
    if "family" in df:
        df = df[df["family"] == "paper"]
    return df[df["kind"] == "question"] if "kind" in df else df


def _subplots(ncols: int = 1, width: float = 7.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, 3.8), squeeze=False)


def series(df: pd.DataFrame, exclude: tuple[str, ...] = ()) -> pd.Series:
    """A name per row: its method, joined with the other labels (model, dataset, setting) that vary in `df`
    (one plot line, or one case-study column, each)."""
    varying = [c for c in LABELS if c in df and c not in exclude and (c == "method" or df[c].nunique() > 1)]
    return df[varying].fillna("").astype(str).agg(lambda row: " · ".join(v for v in row if v), axis=1)


def plot_bleu_vs_length(per_sample: pd.DataFrame):
    """Fig. 5: mean BLEU per target-length bin, one line per method (× varying labels, `series`),
    samples as faint points."""
    d = _paper_questions(per_sample).dropna(subset=["target_tokens", "bleu"])
    n_bins = min(6, d["target_tokens"].nunique())
    d = d.assign(bin=pd.qcut(d["target_tokens"], n_bins, duplicates="drop") if n_bins > 1 else 0)
    fig, axes = _subplots()
    ax = axes[0, 0]
    for method, sub in d.groupby(series(d), sort=False):
        line = sub.groupby("bin", observed=True).agg(x=("target_tokens", "mean"), y=("bleu", "mean"))
        points = ax.scatter(sub["target_tokens"], sub["bleu"], s=8, alpha=0.25)
        ax.plot(line["x"], line["y"], marker="o", label=str(method), color=points.get_facecolor()[0][:3])
    ax.set(xlabel="target length (tokens)", ylabel="BLEU (paper family, ×100)")
    ax.legend(fontsize=8)
    return fig


def plot_sweep(df: pd.DataFrame, name: str):
    """Fig. 6: paper-family original-question metrics against the swept value, one line per method."""
    d = _paper_questions(df)
    values = sorted_values(pd.Series(d["_sweep"].unique()))
    position = {v: i for i, v in enumerate(values)}
    metrics = [m for m in METRICS if m in d and d[m].notna().any()]
    fig, axes = _subplots(len(metrics), 3.6 * len(metrics))
    for ax, metric in zip(axes[0], metrics):
        for method, sub in d.groupby(series(d, exclude=("setting",)), sort=False):
            line = sub.groupby("_sweep")[metric].mean()
            ax.plot([position[v] for v in line.index], line.values, marker="o", label=str(method))
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set(xlabel=name, ylabel=f"{METRICS[metric]} (×100)")
    axes[0, 0].legend(fontsize=8)
    return fig


def plot_categories(df: pd.DataFrame):
    """Fig. 4: mean BLEU per EditEverything category, grouped bars per method."""
    d = _paper_questions(df)
    table = d.pivot_table(index="category", columns="method", values="bleu", aggfunc="mean", sort=False)
    fig, axes = _subplots(width=max(7.5, 0.9 * len(table)))
    table.plot.bar(ax=axes[0, 0], rot=30, width=0.8)
    axes[0, 0].set(xlabel="category", ylabel="BLEU (paper family, ×100)")
    axes[0, 0].legend(fontsize=8)
    return fig


def plot_traces(traces: pd.DataFrame):
    """δ-loss per optimisation step: mean over requests and windows, band = 10–90 % quantiles."""
    fig, axes = _subplots()
    ax = axes[0, 0]
    for method, sub in traces.groupby(series(traces), sort=False):
        q = sub.groupby("step")["loss"].quantile([0.1, 0.5, 0.9]).unstack()
        mean = sub.groupby("step")["loss"].mean()
        (line,) = ax.plot(mean.index, mean.values, label=str(method))
        ax.fill_between(q.index, q[0.1], q[0.9], alpha=0.2, color=line.get_color())
    if (traces["loss"] > 0).all():
        ax.set_yscale("log")
    ax.set(xlabel="δ optimisation step", ylabel="loss")
    ax.legend(fontsize=8)
    return fig


def plot_frontier(points: pd.DataFrame):
    """Question BLEU against first-token agreement per run of `points` (muke.eval.integrity.frontier_points),
    coloured by the answers' repetition rate; the Pareto-optimal runs joined by a step line, numbered, and named
    in a key."""
    from matplotlib.lines import Line2D

    fig, axes = _subplots()
    ax = axes[0, 0]
    grey = points[points["repetition"].isna()]
    ax.scatter(grey["question_bleu"], grey["first_token_agreement"], color="0.75", edgecolors="k")
    coloured = points.dropna(subset=["repetition"])
    if len(coloured):
        xy = coloured["question_bleu"], coloured["first_token_agreement"]
        dots = ax.scatter(*xy, c=coloured["repetition"], cmap="viridis", vmin=0, edgecolors="k")
        fig.colorbar(dots, ax=ax, label="repetition rate of the answers")
    front = points[points["pareto"]].sort_values(["question_bleu", "first_token_agreement"], ascending=[True, False])
    ax.step(front["question_bleu"], front["first_token_agreement"], where="pre", color="k", linewidth=1)
    # Pareto runs numbered beside their dots (alternately above and below) and named in a key: names of runs a
    # few points apart would print over each other
    for k, run in enumerate(front.itertuples(), 1):
        xy = (run.question_bleu, run.first_token_agreement)
        ax.annotate(str(k), xy, xytext=(4, 4 if k % 2 else -11), textcoords="offset points", fontsize=8)
    if len(front):
        names = [Line2D([], [], linestyle="none", label=f"{k}: {name}") for k, name in enumerate(front["run"], 1)]
        ax.legend(handles=names, title="Pareto-optimal runs", loc="lower left", fontsize=7, handlelength=0)
    # both axes on their whole 0–100 scale: runs a few points apart are not drawn as far apart
    ax.set(xlabel="question BLEU (×100)", ylabel="first-token agreement (%)", xlim=(0, 108), ylim=(0, 108))
    return fig


def frontier_figure(points: pd.DataFrame) -> list[str]:
    """The frontier figure (`plot_frontier`) where `points` has ≥ 2 runs to compare, else nothing."""
    return [_figure(FRONTIER_TITLE, plot_frontier(points), FRONTIER_CAPTION)] if len(points) >= 2 else []


def _figure_or_note(ok: bool, title: str, plot, caption: str, missing: str) -> str:
    """The figure `plot()` draws when its data is there (ok), else a note saying what is missing."""
    return _figure(title, plot(), caption) if ok else note(missing)


def figures(edit: pd.DataFrame, per_sample, traces, found: list[tuple[str, pd.DataFrame]]) -> list[str]:
    """The figure section: each plot, or a note saying which data it lacks. found: the sweeps to plot
    (muke.eval.report.sweeps)."""
    has_lengths = (
        per_sample is not None
        and {"method", "target_tokens", "bleu"} <= set(per_sample.columns)
        and len(_paper_questions(per_sample)) > 0
    )
    parts = [
        _figure_or_note(
            has_lengths,
            "BLEU vs target length (paper Fig. 5)",
            lambda: plot_bleu_vs_length(per_sample),
            "Original questions, paper family; lines: mean per length quantile bin.",
            "BLEU vs target length skipped: no per-sample metrics with target_tokens.",
        )
    ]
    parts += [
        _figure(
            f"Metrics vs {name} (paper Fig. 6)",
            plot_sweep(d, name),
            "Original questions, paper family; mean over requests.",
        )
        for name, d in found
    ]
    if not found:
        parts.append(
            note(
                "Sweep plot skipped: no swept parameter (v_num_grad_steps or "
                "sweep_param/sweep_value with more than one value)."
            )
        )
    source = next((d for d in (per_sample, edit) if d is not None and "category" in d), None)
    parts.append(
        _figure_or_note(
            source is not None,
            "BLEU per category (paper Fig. 4, EditEverything)",
            lambda: plot_categories(source),
            "Original questions, paper family; mean per category.",
            "Per-category plot skipped: no category column (EditEverything only).",
        )
    )
    parts.append(
        _figure_or_note(
            traces is not None and len(traces) > 0,
            "δ-loss traces",
            lambda: plot_traces(traces),
            "Memory-update loss per step; line = mean, band = 10–90 % over requests × windows.",
            "δ-loss plot skipped: no traces given.",
        )
    )
    return parts
