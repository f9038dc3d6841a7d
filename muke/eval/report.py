"""The HTML report: paper-style tables (Table 1 edit metrics, Table 2 locality), the paper's figures
(Fig. 4 per-category, Fig. 5 BLEU vs target length, Fig. 6 metric vs swept value, δ-loss traces),
failures, and everything a reviewer needs to reproduce the numbers.

One self-contained `index.html` (inline CSS, images as base64 PNG) plus each table as CSV beside it.
Everything that comes from data is HTML-escaped."""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd

from muke.io import atomic_path, sha256, write_text

LABELS = ["model", "dataset", "method", "setting"]
SWEEP_COLUMNS = ["v_num_grad_steps", "sweep_param", "sweep_value"]
KINDS = {"question": "Ori", "para_question": "Para", "sub_questions": "Sub"}
METRICS = {"bleu": "BLEU", "bertscore": "BERTScore", "rouge_l": "ROUGE-L"}
FAMILIES = {
    "paper": "paper family: char-level BLEU (nltk), MiniLM cosine “BERTScore”, ROUGE-L recall (rouge "
             "package) — comparable with the paper's Table 1",
    "standard": "standard family: sacrebleu word-level BLEU, bert-score F1, rouge-score ROUGE-L F1 (stemmed)",
}
PACKAGES = ["muke", "torch", "transformers", "snakemake", "lm_eval", "numpy", "pandas", "matplotlib"]
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


# ---------------------------------------------------------------------------- small helpers

def _esc(value) -> str:
    return html.escape(str(value))


def _read(frame) -> pd.DataFrame | None:
    """A DataFrame, or a Parquet/CSV path read into one; None stays None."""
    if frame is None or isinstance(frame, pd.DataFrame):
        return frame
    path = Path(frame)
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


def _fmt(x) -> str:
    return "—" if pd.isna(x) else f"{x:.2f}"


def _present(df: pd.DataFrame, columns: list[str]) -> list[str]:
    """The columns of `columns` that `df` has and that are not all empty."""
    return [c for c in columns if c in df and not df[c].replace("", pd.NA).isna().all()]


def _table(df: pd.DataFrame, text: bool = False) -> str:
    """An escaped HTML table (pandas escapes cell text and headers); `text`: left-aligned cells."""
    table = df.to_html(escape=True, border=0, na_rep="—", index=not isinstance(df.index, pd.RangeIndex),
                       classes="text" if text else None)
    return f"<div class='scroll'>{table}</div>"


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=not isinstance(df.index, pd.RangeIndex))


def _flat(df: pd.DataFrame) -> pd.DataFrame:
    """Column MultiIndex joined with ' ' for CSV."""
    if isinstance(df.columns, pd.MultiIndex):
        df = df.set_axis([" ".join(map(str, c)).strip() for c in df.columns], axis=1)
    return df


def _pre_edit_first(df: pd.DataFrame, column: str) -> pd.DataFrame:
    key = df[column].astype(str).ne("pre-edit")
    return df.assign(_k=key).sort_values("_k", kind="stable").drop(columns="_k")


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
    """Table 1: rows = model × dataset × method, columns = kind (Ori/Para/Sub) × metric, formatted."""
    d = df[df["family"] == family]
    labels = _row_labels(d, ["kind"])
    d = _pre_edit_first(d, "method") if "method" in d else d
    long = _labelled(d, labels).melt(id_vars=labels + ["kind"], value_vars=[m for m in METRICS if m in d],
                                     var_name="metric")
    long["kind"] = long["kind"].map(lambda k: KINDS.get(k, k))
    wide = long.pivot_table(index=labels, columns=["kind", "metric"], values="value", aggfunc="first",
                            sort=False, dropna=False).dropna(how="all")   # not the product of the labels
    order = [(k, m) for k in list(KINDS.values()) + sorted(set(long["kind"]) - set(KINDS.values()))
             for m in METRICS if (k, m) in wide.columns and wide[(k, m)].notna().any()]
    wide = wide[order].rename(columns=METRICS, level=1)
    return wide.map(_fmt)


def locality_table(df: pd.DataFrame) -> pd.DataFrame:
    """Table 2: rows = model state (pre-edit first), columns = task / metric, cells 'value ± stderr' ×100."""
    d = _pre_edit_first(df, "model_state")
    labels = _row_labels(d, ["model_state", "task", "metric"]) + ["model_state"]
    err = d["stderr"] if "stderr" in d else pd.Series(float("nan"), index=d.index)
    cell = [_fmt(100 * v) + ("" if pd.isna(e) else f" ± {100 * e:.2f}") for v, e in zip(d["value"], err)]
    wide = _labelled(d, labels).assign(cell=cell).pivot_table(
        index=labels, columns=["task", "metric"], values="cell", aggfunc="first", sort=False)
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


def _sorted_values(values: pd.Series) -> list:
    numeric = pd.to_numeric(values, errors="coerce")
    return list(values.iloc[numeric.argsort()] if numeric.notna().all() else values.sort_values())


def sweep_table(df: pd.DataFrame, name: str, family: str) -> pd.DataFrame:
    """Original-question metrics side by side for each swept value: columns = value × metric."""
    d = df[(df["family"] == family) & (df["kind"] == "question")]
    labels = [c for c in _present(d, LABELS) if c != "setting"]
    long = _labelled(d, labels).melt(id_vars=labels + ["_sweep"], value_vars=[m for m in METRICS if m in d],
                                     var_name="metric")
    wide = long.pivot_table(index=labels, columns=["_sweep", "metric"], values="value", aggfunc="mean",
                            sort=False)
    values = _sorted_values(pd.Series(d["_sweep"].unique()))
    wide = wide[[(v, m) for v in values for m in METRICS if (v, m) in wide.columns]]
    wide.columns = pd.MultiIndex.from_tuples([(f"{name}={v}", METRICS[m]) for v, m in wide.columns])
    return wide.map(_fmt)


# ---------------------------------------------------------------------------- plots

def _png(fig) -> str:
    """A matplotlib figure as a base64 PNG string (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(title: str, fig, caption: str) -> str:
    return (f"<figure><img alt='{_esc(title)}' src='data:image/png;base64,{_png(fig)}'>"
            f"<figcaption><b>{_esc(title)}.</b> {_esc(caption)}</figcaption></figure>")


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


def _series(df: pd.DataFrame, exclude: tuple[str, ...] = ()) -> pd.Series:
    """One plot line per method, split further by the other labels (model, dataset, setting) that vary."""
    varying = [c for c in LABELS if c in df and c not in exclude and (c == "method" or df[c].nunique() > 1)]
    return df[varying].fillna("").astype(str).agg(lambda row: " · ".join(v for v in row if v), axis=1)


def plot_bleu_vs_length(per_sample: pd.DataFrame):
    """Fig. 5: mean BLEU per target-length bin, one line per method (× varying labels, `_series`),
    samples as faint points."""
    d = _paper_questions(per_sample).dropna(subset=["target_tokens", "bleu"])
    n_bins = min(6, d["target_tokens"].nunique())
    d = d.assign(bin=pd.qcut(d["target_tokens"], n_bins, duplicates="drop") if n_bins > 1 else 0)
    fig, axes = _subplots()
    ax = axes[0, 0]
    for method, sub in d.groupby(_series(d), sort=False):
        line = sub.groupby("bin", observed=True).agg(x=("target_tokens", "mean"), y=("bleu", "mean"))
        points = ax.scatter(sub["target_tokens"], sub["bleu"], s=8, alpha=0.25)
        ax.plot(line["x"], line["y"], marker="o", label=str(method), color=points.get_facecolor()[0][:3])
    ax.set(xlabel="target length (tokens)", ylabel="BLEU (paper family, ×100)")
    ax.legend(fontsize=8)
    return fig


def plot_sweep(df: pd.DataFrame, name: str):
    """Fig. 6: paper-family original-question metrics against the swept value, one line per method."""
    d = _paper_questions(df)
    values = _sorted_values(pd.Series(d["_sweep"].unique()))
    position = {v: i for i, v in enumerate(values)}
    metrics = [m for m in METRICS if m in d and d[m].notna().any()]
    fig, axes = _subplots(len(metrics), 3.6 * len(metrics))
    for ax, metric in zip(axes[0], metrics):
        for method, sub in d.groupby(_series(d, exclude=("setting",)), sort=False):
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
    for method, sub in traces.groupby(_series(traces), sort=False):
        q = sub.groupby("step")["loss"].quantile([0.1, 0.5, 0.9]).unstack()
        mean = sub.groupby("step")["loss"].mean()
        (line,) = ax.plot(mean.index, mean.values, label=str(method))
        ax.fill_between(q.index, q[0.1], q[0.9], alpha=0.2, color=line.get_color())
    if (traces["loss"] > 0).all():
        ax.set_yscale("log")
    ax.set(xlabel="δ optimisation step", ylabel="loss")
    ax.legend(fontsize=8)
    return fig


def _note(text: str) -> str:
    return f"<p class='note'>{_esc(text)}</p>"


def _plots(edit: pd.DataFrame, per_sample, traces) -> list[str]:
    """The figure section: each plot, or a note saying which data it lacks."""
    parts = []
    need = {"method", "target_tokens", "bleu"}
    if per_sample is not None and need <= set(per_sample.columns) and len(_paper_questions(per_sample)):
        parts.append(_figure("BLEU vs target length (paper Fig. 5)", plot_bleu_vs_length(per_sample),
                             "Original questions, paper family; lines: mean per length quantile bin."))
    else:
        parts.append(_note("BLEU vs target length skipped: no per-sample metrics with target_tokens."))
    found = sweeps(edit) or sweeps(per_sample)
    for name, d in found:
        parts.append(_figure(f"Metrics vs {name} (paper Fig. 6)", plot_sweep(d, name),
                             "Original questions, paper family; mean over requests."))
    if not found:
        parts.append(_note("Sweep plot skipped: no swept parameter (v_num_grad_steps or "
                           "sweep_param/sweep_value with more than one value)."))
    source = next((d for d in (per_sample, edit) if d is not None and "category" in d), None)
    if source is not None:
        parts.append(_figure("BLEU per category (paper Fig. 4, EditEverything)", plot_categories(source),
                             "Original questions, paper family; mean per category."))
    else:
        parts.append(_note("Per-category plot skipped: no category column (EditEverything only)."))
    if traces is not None and len(traces):
        parts.append(_figure("δ-loss traces", plot_traces(traces),
                             "Memory-update loss per step; line = mean, band = 10–90 % over requests × windows."))
    else:
        parts.append(_note("δ-loss plot skipped: no traces given."))
    return parts


# ---------------------------------------------------------------------------- reproducibility

def git_info() -> dict:
    """Commit and dirty flag of the git checkout holding muke's source, else 'unknown'."""
    src = Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if not (top / "muke").is_dir() or not (top / "muke").samefile(src):
            raise RuntimeError("muke is not the checkout's own package")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return {"commit": "unknown", "dirty": "unknown"}


def _size(path: Path) -> int:
    """Bytes of a file, or of a folder's files."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def checksums(inputs) -> pd.DataFrame:
    rows = [{"path": str(p), "bytes": _size(Path(p)) if Path(p).exists() else 0,
             "sha256": sha256(p) if Path(p).exists() else "missing"} for p in inputs]
    return pd.DataFrame(rows, columns=["path", "bytes", "sha256"])


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def torch_info() -> dict:
    """torch / CUDA / GPU facts and the determinism flags of this process."""
    try:
        import torch
    except ImportError:
        return {"torch": "not installed", "determinism": "unknown (no torch)"}
    cuda = torch.cuda.is_available()
    info = {"torch": torch.__version__, "cuda (build)": torch.version.cuda or "none",
            "cuda available": cuda,
            "gpus": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none",
            "cudnn.deterministic": torch.backends.cudnn.deterministic,
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    info["determinism"] = (
        f"GPU: torch.backends.cudnn.deterministic={info['cudnn.deterministic']}, "
        f"torch.use_deterministic_algorithms={info['use_deterministic_algorithms']}; GPU kernels may still "
        "differ across GPU models and library versions." if cuda else
        "CPU only: deterministic (fixed seeds, greedy decoding, CPU kernels with reproducible reductions).")
    return info


def seeds(config, prefix: str = "") -> dict:
    """Every config key naming a seed or a determinism setting, with its dotted path."""
    out = {}
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, (dict, list)):
            out.update(seeds(value, path + "."))
        elif "seed" in str(key).lower() or "determin" in str(key).lower():
            out[path] = value
    return out


def read_benchmarks(root: str | Path | None, identities=None) -> pd.DataFrame:
    """Snakemake benchmark files under `root`: one row per repeat, `rule` from the path. With
    `identities`, only the files whose path names one of them (the jobs of the current plan: the
    folder also keeps the benchmarks of earlier settings)."""
    if root is None or not Path(root).is_dir():
        return pd.DataFrame()
    frames = []
    for path in sorted(p for p in Path(root).rglob("*") if p.suffix in (".tsv", ".txt") and p.is_file()):
        rel = path.relative_to(root)
        if identities is not None and not any(i in str(rel) for i in identities):
            continue
        df = pd.read_csv(path, sep="\t")
        if "s" not in df:
            continue
        frames.append(df.assign(rule=rel.parts[0] if len(rel.parts) > 1 else path.stem, job=str(rel)))
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    for col in ("s", "max_rss"):
        df[col] = pd.to_numeric(df.get(col), errors="coerce")
    return df


def benchmark_summary(bench: pd.DataFrame) -> pd.DataFrame:
    """Per rule: jobs, total and longest wall time, peak resident memory."""
    g = bench.groupby("rule", sort=True)
    out = pd.DataFrame({"jobs": g["job"].nunique(), "wall s (total)": g["s"].sum(),
                        "wall s (longest job)": g["s"].max(), "peak max_rss (MB)": g["max_rss"].max()})
    return out.map(_fmt).assign(jobs=g["job"].nunique())


def _dict_table(d: dict, key: str, value: str) -> pd.DataFrame:
    text = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in d.items()}
    return pd.DataFrame({key: list(text), value: list(text.values())})


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False)


def _reproducibility(config, stage_identities, inputs, bench) -> tuple[list[str], dict]:
    """The reproducibility section and its tables (for CSV)."""
    g = git_info()
    if not isinstance(stage_identities, pd.DataFrame):
        stage_identities = _dict_table(stage_identities or {}, "stage", "identity")
    tables = {"stage_identities": stage_identities,
              "input_checksums": checksums(inputs or []),
              "versions": _dict_table({**package_versions(), **torch_info()}, "package / fact", "value")}
    seed_text = ", ".join(f"{k} = {v}" for k, v in seeds(config or {}).items()) or "none set in the config"
    parts = ["<h2 id='repro'>Reproducibility</h2>",
             f"<p>git commit <code>{_esc(g['commit'])}</code>, working tree dirty: <b>{_esc(g['dirty'])}</b></p>",
             f"<p>Seeds / determinism keys: {_esc(seed_text)}</p>",
             f"<p>{_esc(tables['versions'].set_index('package / fact')['value'].get('determinism'))} "
             "(flags as seen by the report process; each stage's manifest records its own versions.)</p>",
             "<h3>Package versions and hardware</h3>", _table(tables["versions"], text=True),
             "<h3>Stage parameter identities</h3>",
             "<p class='caption'>Each job's identity hashes its own parameters, its inputs' identities and the "
             "muke code it runs; the job's output folder carries it, and its manifest.json lists the "
             "parameters.</p>", _table(tables["stage_identities"], text=True),
             "<h3>Input data checksums (sha256)</h3>", _table(tables["input_checksums"], text=True),
             "<h3>Wall time and peak memory per stage (Snakemake benchmarks)</h3>"]
    if len(bench):
        tables["benchmarks"] = bench
        parts.append(_table(benchmark_summary(bench)))
    else:
        parts.append(_note("No Snakemake benchmark files found."))
    parts += ["<h3>Resolved configuration</h3>", f"<pre>{_esc(_yaml(config or {}))}</pre>"]
    return parts, tables


# ---------------------------------------------------------------------------- the page

def _failures(failures: pd.DataFrame | None) -> tuple[list[str], pd.DataFrame | None]:
    if failures is None:
        return [_note("No failure records given.")], None
    cols = [c for c in ["id", "stage", "reason"] if c in failures] + \
        [c for c in failures if c not in ("id", "stage", "reason")]
    failures = failures[cols].reset_index(drop=True)
    parts = [f"<p>Failed requests: <b>{len(failures)}</b></p>"]
    return parts + ([_table(failures, text=True)] if len(failures) else []), failures


def _edit_section(edit: pd.DataFrame) -> tuple[list[str], dict]:
    parts, tables = ["<h2 id='edit'>Edit metrics (Table 1)</h2>",
                     "<p class='caption'>×100 against the target answer; Ori = original question, Para = "
                     "paraphrased question, Sub = sub-questions (mean per request, then over requests).</p>"], {}
    families = list(dict.fromkeys(edit["family"])) if len(edit) else []
    for family in families:
        t = edit_table(edit, family)
        tables[f"edit_metrics_{family}"] = t
        parts += [f"<h3>{_esc(family)} family</h3>",
                  f"<p class='caption'>{_esc(FAMILIES.get(family, family + ' family'))}</p>", _table(t)]
    for name, d in sweeps(edit):
        parts.append(f"<h3>Sweep over {_esc(name)}</h3>")
        for family in families:
            t = sweep_table(d, name, family)
            tables[f"sweep_{name}_{family}"] = t
            parts += [f"<p class='caption'>Original question, {_esc(FAMILIES.get(family, family))}</p>", _table(t)]
    if not families:
        parts.append(_note("No edit metrics."))
    return parts, tables


def _locality_section(loc: pd.DataFrame) -> tuple[list[str], dict]:
    parts = ["<h2 id='locality'>Locality (Table 2)</h2>",
             "<p class='caption'>lm-eval scores ×100, value ± standard error; the pre-edit model is the "
             "reference row.</p>"]
    if loc is None or not len(loc):
        return parts + [_note("No locality results.")], {}
    t = locality_table(loc)
    return parts + [_table(t)], {"locality": t}


def build_report(edit_metrics, locality, out_dir, *, config: dict | None = None,
                 stage_identities: dict | pd.DataFrame | None = None, inputs=(), benchmarks_dir=None,
                 benchmark_identities=None, traces=None, failures=None, per_sample=None,
                 title: str = "μKE report") -> Path:
    """Write `out_dir/index.html` and the tables as CSV beside it; return the HTML path.

    `edit_metrics`, `locality`, `traces`, `failures`, `per_sample`: DataFrames or Parquet/CSV paths.
    `stage_identities`: {stage: identity}, or a table (one row per run, a column per stage).
    `benchmark_identities`: read only the benchmark files whose path names one of these."""
    out_dir = Path(out_dir)
    edit, loc = _read(edit_metrics), _read(locality)
    traces, failures, per_sample = _read(traces), _read(failures), _read(per_sample)
    edit_parts, tables = _edit_section(edit)
    loc_parts, loc_tables = _locality_section(loc)
    fail_parts, fail_table = _failures(failures)
    bench = read_benchmarks(benchmarks_dir, benchmark_identities)
    repro_parts, repro_tables = _reproducibility(config, stage_identities, inputs, bench)
    tables.update(loc_tables, **repro_tables)
    if fail_table is not None:
        tables["failures"] = fail_table
    nav = "".join(f"<a href='#{a}'>{t}</a>" for a, t in [("edit", "Edit metrics"), ("locality", "Locality"),
                  ("plots", "Plots"), ("failures", "Failures"), ("repro", "Reproducibility")])
    body = [f"<h1>{_esc(title)}</h1>", f"<nav>{nav}</nav>", *edit_parts, *loc_parts,
            "<h2 id='plots'>Plots</h2>", *_plots(edit, per_sample, traces),
            "<h2 id='failures'>Failures</h2>", *fail_parts, *repro_parts]
    for name, t in tables.items():
        _write_csv(_flat(t), out_dir / f"{name}.csv")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return write_text(out_dir / "index.html", page)
