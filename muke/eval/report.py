"""The HTML report: paper-style tables (Table 1 edit metrics, Table 2 locality), the paper's figures
(Fig. 4 per-category, Fig. 5 BLEU vs target length, Fig. 6 metric vs swept value, δ-loss traces:
muke.eval.plots), failures, and everything a reviewer needs to reproduce the numbers
(muke.eval.environment).

One self-contained `index.html` (inline CSS, images as base64 PNG) plus each table as CSV beside it.
Everything that comes from data is HTML-escaped."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from muke.eval import case_study, integrity, sequential
from muke.eval.case_study import PRE_EDIT
from muke.eval.environment import read_benchmarks, reproducibility
from muke.eval.intervals import DESCRIPTION, separated
from muke.eval.layer_trace import layers_section
from muke.eval.page import LABELS, METRICS, esc, fmt, note, sorted_values, table
from muke.eval.plots import figures, series
from muke.io import atomic_path, write_text

SWEEP_COLUMNS = ["v_num_grad_steps", "sweep_param", "sweep_value"]
KINDS = {"question": "Ori", "para_question": "Para", "sub_questions": "Sub"}
CASE_LIMIT = 8  # requests shown in the case study
NBSP = "\u00a0"
FAMILIES = {
    "paper": "paper family: char-level BLEU (nltk), MiniLM cosine “BERTScore”, ROUGE-L recall (rouge "
    "package) — comparable with the paper's Table 1",
    "standard": "standard family: sacrebleu word-level BLEU, bert-score F1, rouge-score ROUGE-L F1 (stemmed)",
}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;padding:1.5em;
color:#222;line-height:1.45}
h1{border-bottom:3px solid #36c;padding-bottom:.3em}h2{margin-top:2em;border-bottom:1px solid #ccc}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.92em}
th,td{padding:3px 10px;border-bottom:1px solid #e3e3e3;text-align:right;vertical-align:top}
thead th{background:#f0f4fa;text-align:center}tbody th{text-align:left;background:#fafafa;white-space:nowrap}.scroll{overflow-x:auto}
tbody tr:hover{background:#fffbe6}.caption{color:#555;font-size:.92em;margin:.2em 0}
.note{color:#8a5a00;background:#fff6e0;padding:.4em .8em;border-left:4px solid #e0a000}
figure{margin:1em 0 2em}figure img{max-width:100%;border:1px solid #ddd}figcaption{color:#555;font-size:.9em}
.text td,.text th{text-align:left}pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}
"""


SECTIONS = [
    ("edit", "Edit metrics"),
    (integrity.ANCHOR, "Integrity"),
    ("case-study", "Case study"),
    ("locality", "Locality"),
    (sequential.ANCHOR, "Sequential editing"),
    ("plots", "Plots"),
    ("failures", "Failures"),
    ("repro", "Reproducibility"),
]  # (anchor, title) of the page's navigation
REPETITION = {"repetition": "repetition (target)"}  # the edit table's fluency column (muke.eval.fluency)
UNSCALED_TASK = "text_shift"  # muke.eval.retention: KL (nats/token) and perplexity, not fractions


# ---------------------------------------------------------------------------- small helpers


def _read(frame) -> pd.DataFrame | None:
    """A DataFrame, or a Parquet/CSV path read into one; None stays None."""
    if frame is None or isinstance(frame, pd.DataFrame):
        return frame
    path = Path(frame)
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


def _present(df: pd.DataFrame, columns: list[str]) -> list[str]:
    """The columns of `columns` that `df` has and that are not all empty."""
    return [c for c in columns if c in df and not df[c].replace("", pd.NA).isna().all()]


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=not isinstance(df.index, pd.RangeIndex))


def _flat(df: pd.DataFrame) -> pd.DataFrame:
    """Column MultiIndex joined with ' ' for CSV."""
    if isinstance(df.columns, pd.MultiIndex):
        df = df.set_axis([" ".join(map(str, c)).strip() for c in df.columns], axis=1)
    return df


def _pre_edit_first(df: pd.DataFrame, column: str) -> pd.DataFrame:
    key = df[column].astype(str).ne(PRE_EDIT)
    return df.assign(_k=key).sort_values("_k", kind="stable").drop(columns="_k")


# ---------------------------------------------------------------------------- cells with intervals


def _bounds(metric: str) -> list[str]:
    return [f"{metric}_ci_low", f"{metric}_ci_high"]


def _pre_edit_bounds(df: pd.DataFrame, bounds: list[str]) -> pd.DataFrame:
    """Per row, the `bounds` of the pre-edit row of its model, dataset, family and kind (the one with
    the same setting where there is one, as under a generation sweep); NaN where there is none."""
    keys = [c for c in ("model", "dataset", "family", "kind") if c in df]
    pre = df[df["method"].astype(str) == PRE_EDIT] if "method" in df else df.iloc[:0]
    found = [
        df[on].merge(pre[on + bounds].drop_duplicates(on), on=on, how="left")[bounds]
        for on in ([*keys, "setting"] if "setting" in df else keys, keys)
    ]
    return found[0].fillna(found[1]).set_axis(df.index)


def _cell(mean, low, high, ref_low, ref_high) -> str | None:
    """'mean [low, high]' ('mean' without an interval), the mean marked ▲ / ▼ where [low, high] lies
    wholly above / below [ref_low, ref_high]; None without a mean. No-break spaces (NBSP) keep the mean
    and the interval whole, so that a narrow column shows the interval as a second line."""
    if pd.isna(mean):
        return None
    mark = NBSP + ("▲" if low > ref_high else "▼") if separated(low, high, ref_low, ref_high) else ""
    return fmt(mean) + mark + ("" if pd.isna(low) or pd.isna(high) else f" [{fmt(low)},{NBSP}{fmt(high)}]")


def with_cells(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with the table cell `{m}_cell` of each metric m (`_cell`): its mean, its interval where the
    row has one, marked where that is separated from the pre-edit model's (muke.eval.intervals.separated)."""
    metrics = [m for m in METRICS if m in df]
    bounds = [b for m in metrics for b in _bounds(m)]
    d = df.assign(**{b: pd.to_numeric(df[b]) if b in df else float("nan") for b in bounds})
    ref = _pre_edit_bounds(d, bounds)
    return df.assign(
        **{
            f"{m}_cell": [_cell(*v) for v in zip(d[m], *(d[b] for b in _bounds(m)), *(ref[b] for b in _bounds(m)))]
            for m in metrics
        },
        **({} if (rep := integrity.repetition_cells(df)) is None else {"repetition_cell": rep}),
    )


def _has_intervals(df: pd.DataFrame) -> bool:
    return any(b in df and df[b].notna().any() for m in METRICS for b in _bounds(m))


def _long_cells(d: pd.DataFrame, id_vars: list[str]) -> pd.DataFrame:
    """The `with_cells` cells of `d` in long format: id_vars, metric, value."""
    cells = {f"{m}_cell": m for m in [*METRICS, *REPETITION] if f"{m}_cell" in d}
    long = d.melt(id_vars=id_vars, value_vars=list(cells), var_name="metric")
    return long.assign(metric=long["metric"].map(cells))


# ---------------------------------------------------------------------------- tables


def _labelled(df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Empty labels as '' so that grouping keeps their rows."""
    return df.assign(**{c: df[c].fillna("") for c in labels})


def _row_labels(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """Label columns that identify a row; adds `run` when the labels alone would merge distinct runs.
    sweep_param / sweep_value only repeat `setting`, so they show only where it is absent."""
    labels = _present(df, LABELS)
    labels += [c for c in _present(df, SWEEP_COLUMNS) if not ("setting" in labels and c.startswith("sweep_"))]
    if "run" in df and df.duplicated(labels + keys).any():
        labels.append("run")
    return labels


def edit_table(df: pd.DataFrame, family: str) -> pd.DataFrame:
    """Table 1: rows = model × dataset × method, columns = kind (Ori/Para/Sub) × metric, then the answers'
    repetition beside their targets' where the samples had it; `df` holds the cells (`with_cells`)."""
    d = df[df["family"] == family]
    labels = _row_labels(d, ["kind"])
    d = _pre_edit_first(d, "method") if "method" in d else d
    long = _long_cells(_labelled(d, labels), labels + ["kind"])
    long["kind"] = long["kind"].map(lambda k: KINDS.get(k, k))
    wide = long.pivot_table(
        index=labels, columns=["kind", "metric"], values="value", aggfunc="first", sort=False, dropna=False
    ).dropna(how="all")  # not the product of the labels
    order = [
        (k, m)
        for k in list(KINDS.values()) + sorted(set(long["kind"]) - set(KINDS.values()))
        for m in [*METRICS, *REPETITION]
        if (k, m) in wide.columns and wide[(k, m)].notna().any()
    ]
    return wide[order].rename(columns={**METRICS, **REPETITION}, level=1).fillna("—")


def locality_table(df: pd.DataFrame) -> pd.DataFrame:
    """Table 2: rows = model state (pre-edit first), columns = task / metric, cells 'value ± stderr', ×100
    except the text shift (KL in nats per token, perplexity), which is shown as it is."""
    d = _pre_edit_first(df, "model_state")
    labels = _row_labels(d, ["model_state", "task", "metric"]) + ["model_state"]
    err = d["stderr"] if "stderr" in d else pd.Series(float("nan"), index=d.index)
    scale = d["task"].map(lambda task: 1.0 if task == UNSCALED_TASK else 100.0)
    cell = [fmt(s * v) + ("" if pd.isna(e) else f" ± {s * e:.2f}") for v, e, s in zip(d["value"], err, scale)]
    wide = (
        _labelled(d, labels)
        .assign(cell=cell)
        .pivot_table(index=labels, columns=["task", "metric"], values="cell", aggfunc="first", sort=False)
    )
    return wide.fillna("—")


def sweeps(df: pd.DataFrame | None) -> list[tuple[str, pd.DataFrame]]:
    """Each swept parameter with >1 values: (name, its rows with the value in column `_sweep`)."""
    if df is None:
        return []
    out = []
    if "v_num_grad_steps" in df and df["v_num_grad_steps"].nunique() > 1:
        out.append(("v_num_grad_steps", df.assign(_sweep=df["v_num_grad_steps"])))
    if {"sweep_param", "sweep_value"} <= set(df.columns):
        for name, sub in df.dropna(subset=["sweep_param"]).groupby("sweep_param", sort=True):
            if sub["sweep_value"].nunique() > 1:
                out.append((str(name), sub.assign(_sweep=sub["sweep_value"])))
    return out


def sweep_table(df: pd.DataFrame, name: str, family: str) -> pd.DataFrame:
    """Original-question metrics side by side for each swept value: columns = value × metric; `df`
    holds the cells (`with_cells`), one run per label row and value (a one-key sweep)."""
    d = df[(df["family"] == family) & (df["kind"] == "question")]
    labels = [c for c in _present(d, LABELS) if c != "setting"]
    long = _long_cells(_labelled(d, labels), labels + ["_sweep"])
    wide = long.pivot_table(index=labels, columns=["_sweep", "metric"], values="value", aggfunc="first", sort=False)
    values = sorted_values(pd.Series(d["_sweep"].unique()))
    wide = wide[[(v, m) for v in values for m in METRICS if (v, m) in wide.columns]]
    wide.columns = pd.MultiIndex.from_tuples([(f"{name}={v}", METRICS[m]) for v, m in wide.columns])
    return wide.fillna("—")


# ---------------------------------------------------------------------------- the page


def _failures(failures: pd.DataFrame | None) -> tuple[list[str], dict]:
    """The failures section's parts and its table ({"failures": …}; {} without failure records)."""
    if failures is None:
        return [note("No failure records given.")], {}
    cols = [c for c in ["id", "stage", "reason"] if c in failures] + [
        c for c in failures if c not in ("id", "stage", "reason")
    ]
    failures = failures[cols].reset_index(drop=True)
    parts = [f"<p>Failed requests: <b>{len(failures)}</b></p>"]
    return parts + ([table(failures, text=True)] if len(failures) else []), {"failures": failures}


UNSETTLED_CAPTION = (
    "Edits made in passes (hparams.edit_passes) whose last pass still had to move windows. Teacher-forced on the "
    "edited model: off-target windows hold a target token that is not the greedy choice (the answer leaves the "
    "target there); short windows, a target token below the stop probability (v_stop_prob) but possibly still "
    "the greedy choice. More passes, or a larger δ budget, are the levers."
)


def _unsettled(unsettled: pd.DataFrame | None) -> tuple[list[str], dict]:
    """The failures section's part on edits still short after their last edit pass ({"unsettled": …} when any)."""
    if unsettled is None or not len(unsettled):
        return [], {}
    unsettled = unsettled.dropna(axis=1, how="all").reset_index(drop=True)
    off = int((unsettled["off_target_windows"] != "[]").sum())
    parts = [
        f"<p>Edits still short of their target after the last edit pass: <b>{len(unsettled)}</b>; "
        f"their answer leaves the target: <b>{off}</b></p>",
        f"<p class='caption'>{esc(UNSETTLED_CAPTION)}</p>",
        table(unsettled, text=True),
    ]
    return parts, {"unsettled": unsettled}


def _edit_caption(edit: pd.DataFrame) -> str:
    text = (
        "×100 against the target answer; Ori = original question, Para = paraphrased question, Sub = "
        "sub-questions (mean per request, then over requests)."
    )
    if integrity.repetition_cells(edit) is not None:
        text += " " + integrity.REPETITION_CAPTION
    if _has_intervals(edit):
        text += (
            f" Cells: mean [low, high], the {DESCRIPTION}. An ordering between two methods is claimed "
            "only where their intervals do not overlap: ▲ / ▼ marks a cell whose interval lies wholly "
            "above / below the pre-edit model's (same model, dataset, question kind and metric)."
        )
    return f"<p class='caption'>{esc(text)}</p>"


def _edit_section(edit: pd.DataFrame) -> tuple[list[str], dict]:
    parts, tables = ["<h2 id='edit'>Edit metrics (Table 1)</h2>", _edit_caption(edit)], {}
    families = list(dict.fromkeys(edit["family"])) if len(edit) else []
    edit = with_cells(edit)
    for family in families:
        t = edit_table(edit, family)
        tables[f"edit_metrics_{family}"] = t
        parts += [
            f"<h3>{esc(family)} family</h3>",
            f"<p class='caption'>{esc(FAMILIES.get(family, family + ' family'))}</p>",
            table(t),
        ]
    for name, d in sweeps(edit):
        parts.append(f"<h3>Sweep over {esc(name)}</h3>")
        for family in families:
            t = sweep_table(d, name, family)
            tables[f"sweep_{name}_{family}"] = t
            parts += [f"<p class='caption'>Original question, {esc(FAMILIES.get(family, family))}</p>", table(t)]
    if not families:
        parts.append(note("No edit metrics."))
    return parts, tables


def _case_section(rows: pd.DataFrame | None) -> list[str]:
    """Paper App. C: per request the target, the pre-edit answer and each run's (`series`: method and
    the labels that vary), first CASE_LIMIT requests."""
    parts = ["<h2 id='case-study'>Case study (paper App. C)</h2>"]
    if rows is None or not len(rows):
        return parts + [note("Case study skipped: no per-sample answers given.")]
    rows = _pre_edit_first(rows, "method") if "method" in rows else rows
    if "dataset" in rows and rows["dataset"].nunique() > 1:
        rows = rows.assign(id=rows["dataset"].astype(str) + ": " + rows["id"].astype(str))
    rows = rows.assign(method=series(rows, exclude=("dataset",)))
    questions = rows[rows["kind"] != case_study.UNRELATED] if "kind" in rows else rows
    if "run" in rows and questions.duplicated(["id", "method"]).any():
        rows = rows.assign(method=rows["method"] + " · " + rows["run"].astype(str))
    n = questions["id"].nunique()
    parts.append(
        f"<p class='caption'>Original questions of the first {min(n, CASE_LIMIT)} of {n} requests: "
        "the target beside the pre-edit model's answer and each edited model's; below them, where "
        "locality ran, unrelated prompts answered before and after the request's edit.</p>"
    )
    return parts + [case_study.case_study_html(rows, limit=CASE_LIMIT)]


def _locality_section(loc: pd.DataFrame) -> tuple[list[str], dict]:
    parts = [
        "<h2 id='locality'>Locality (Table 2)</h2>",
        "<p class='caption'>lm-eval scores ×100, value ± standard error; the pre-edit model is the "
        "reference row. <code>retention</code>: the unrelated chat prompts' answers after the edit scored "
        "against the unedited model's (×100, 100 = unchanged; <code>prefix_exact_match</code>: their first "
        "tokens equal; “(code)” etc.: one prompt kind); <code>text_shift</code>: KL(pre ‖ post) "
        "of the next-token distributions on held-out text (nats per token) and the perplexity; "
        "<code>first_token_*</code> / <code>token_agreement</code> / <code>answer_kl</code>: the same, "
        "teacher-forced on the unedited answers, at the prompt's last token and inside the answers.</p>",
    ]
    if loc is None or not len(loc):
        return parts + [note("No locality results.")], {}
    t = locality_table(loc)
    return parts + [table(t)], {"locality": t}


def build_report(
    edit_metrics,
    locality,
    out_dir,
    *,
    config: dict | None = None,
    stage_identities: dict | pd.DataFrame | None = None,
    inputs=(),
    benchmarks_dir=None,
    benchmark_identities=None,
    traces=None,
    failures=None,
    unsettled=None,
    per_sample=None,
    case_rows=None,
    jobs=None,
    run_settings=None,
    memory_estimates=(),
    layer_traces=(),
    title: str = "μKE report",
) -> Path:
    """Write `out_dir/index.html` and the tables as CSV beside it; return the HTML path.

    `edit_metrics`, `locality`, `traces`, `failures`, `unsettled` (muke.eval.tables.unsettled), `per_sample`,
    `case_rows` (muke.eval.tables.case_rows): DataFrames or Parquet/CSV paths.
    `stage_identities`: {stage: identity}, or a table (one row per run, a column per stage).
    `benchmark_identities`: read only the benchmark files whose path names one of these.
    `jobs`, `run_settings`: muke.eval.tables.job_hosts / run_settings (where the jobs ran; what each run
    ran with). `memory_estimates`: muke estimate's peak memory of each job as {rule, identity, host_bytes,
    device_bytes, cpu_bytes} (muke.workflow.job_costs.job_memory), beside the benchmarks' measured peaks.
    `layer_traces`: trace_layers folders as {model, dataset, path} (muke.eval.layer_trace)."""
    out_dir = Path(out_dir)
    edit, loc = _read(edit_metrics), _read(locality)
    traces, failures, unsettled, per_sample, case_rows = map(
        _read, (traces, failures, unsettled, per_sample, case_rows)
    )
    edit_parts, tables = _edit_section(edit)
    integrity_parts, integrity_tables = integrity.section(edit, loc)
    loc_parts, loc_tables = _locality_section(loc)
    seq_parts, seq_tables = sequential.section(per_sample, loc)
    fail_parts, fail_tables = _failures(failures)
    unsettled_parts, unsettled_tables = _unsettled(unsettled)
    bench = read_benchmarks(benchmarks_dir, benchmark_identities)
    repro_parts, repro_tables = reproducibility(
        config, stage_identities, inputs, bench, jobs, run_settings, memory_estimates
    )
    tables.update(integrity_tables, **loc_tables, **seq_tables, **repro_tables, **fail_tables, **unsettled_tables)
    body = [
        f"<h1>{esc(title)}</h1>",
        _nav(sequential_runs=bool(seq_parts), traced_layers=bool(layer_traces)),
        *edit_parts,
        *integrity_parts,
        *_case_section(case_rows),
        *loc_parts,
        *seq_parts,
        "<h2 id='plots'>Plots</h2>",
        *figures(edit, per_sample, traces, sweeps(edit) or sweeps(per_sample)),
        *(layers_section(layer_traces) if layer_traces else []),
        "<h2 id='failures'>Failures</h2>",
        *fail_parts,
        *unsettled_parts,
        *repro_parts,
    ]
    _write_tables(tables, out_dir)
    return write_text(out_dir / "index.html", _page(title, body))


def _write_tables(tables: dict, out_dir: Path) -> None:
    for name, t in tables.items():
        _write_csv(_flat(t), out_dir / f"{name}.csv")


def _nav(sequential_runs: bool, traced_layers: bool) -> str:
    """The page's links to its SECTIONS: Sequential editing where there are sequential runs, Layers
    after the plots where layers were traced."""
    shown = [s for s in SECTIONS if sequential_runs or s[0] != sequential.ANCHOR]
    after_plots = shown.index(("plots", "Plots")) + 1
    shown[after_plots:after_plots] = [("layers", "Layers")] * traced_layers
    return "<nav>" + "".join(f"<a href='#{anchor}'>{name}</a>" for anchor, name in shown) + "</nav>"


def _page(title: str, body: list[str]) -> str:
    """The self-contained HTML page: the stylesheet inline, then the body's parts."""
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{CSS}{case_study.CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
