"""Study 8's confirmation tables from workflow runs (docs/study/smollm2-8-integrity.md): per run the efficacy
beside the integrity, the spread over the v_lr perturbations per method and per record, the CPU seconds per
edit, and the efficacy-integrity frontier of all runs as a PNG (muke.eval.plots.plot_frontier).

    python docs/study/tools/integrity_runs.py OUT.png results/study-integrity \
        results/study-integrity-template=key_position:template [results/study-baselines ...]

A folder's `=name:value` labels every run of that folder whose setting is empty (a config that sets the
option in `hparams` rather than sweeping it).
"""

import glob
import json
import sys
from pathlib import Path

import pandas as pd

from muke.eval.integrity import frontier_points
from muke.eval.plots import plot_frontier

THRESHOLD = 85  # the question char BLEU goal


def md(df: pd.DataFrame) -> str:
    out = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(out)


def labelled(frame: pd.DataFrame, label: str | None) -> pd.DataFrame:
    if label is None or "setting" not in frame:
        return frame
    name, value = label.split(":", 1)
    empty = frame["setting"].fillna("").eq("") & frame["method"].ne("pre-edit")
    return frame.assign(setting=frame["setting"].where(~empty, json.dumps({name: value})))


def read(arg: str) -> tuple[Path, str | None, list[dict]]:
    folder, _, label = arg.partition("=")
    spec = json.loads((Path(folder) / "report" / "spec.json").read_text())
    return Path(folder), label or None, spec["runs"]


def per_record(folder: Path, label: str | None, runs: list[dict]) -> pd.DataFrame:
    """One row per (run, record): question BLEU (paper family) and the edited model's first-token agreement."""
    rows = []
    for run in runs:
        if run["method"] == "pre-edit" or not run["files"]["samples"]:
            continue
        s = pd.read_parquet(run["files"]["samples"])
        q = s[(s.family == "paper") & (s.kind == "question")].set_index("id")["bleu"]
        agree = pd.Series(dtype=float)
        if run["files"]["locality"] and Path(run["files"]["locality"]).exists():
            loc = pd.read_parquet(run["files"]["locality"])
            loc = loc[(loc.metric == "first_token_agreement") & loc.request_id.notna()]
            agree = loc.set_index("request_id")["value"] * 100
        setting = run["setting"] or (json.dumps(dict([label.split(":", 1)])) if label else "")
        for rid, bleu in q.items():
            rows.append({"method": run["method"], "setting": setting, "id": rid, "q": bleu, "agree": agree.get(rid)})
    return pd.DataFrame(rows)


def spread(records: pd.DataFrame) -> pd.DataFrame:
    """Per method and setting without v_lr: the records' question BLEU across the v_lr perturbations."""
    records = records.assign(base=records["setting"].map(lambda s: _without(s, "v_lr")))
    out = []
    for (method, base), g in records.groupby(["method", "base"], sort=False):
        by_id = g.groupby("id")["q"]
        points = g.groupby("setting")["q"].mean()
        out.append(
            {
                "method": method,
                "setting": base or "–",
                "perturbations": g["setting"].nunique(),
                "records": by_id.ngroups,
                "Q BLEU per perturbation": " / ".join(f"{v:.1f}" for v in points),
                f"records ≥ {THRESHOLD} in every one": int((by_id.min() >= THRESHOLD).sum()),
                "in some": int((by_id.max() >= THRESHOLD).sum()),
                "record range (mean, max)": f"{(by_id.max() - by_id.min()).mean():.1f}, "
                f"{(by_id.max() - by_id.min()).max():.1f}",
                "first-token agreement per perturbation": " / ".join(
                    f"{v:.1f}" for v in g.groupby("setting")["agree"].mean()
                ),
            }
        )
    return pd.DataFrame(out)


def _without(setting: str, key: str) -> str:
    d = json.loads(setting) if setting else {}
    d.pop(key, None)
    return json.dumps(d, sort_keys=True) if d else ""


def cost(folder: Path) -> pd.DataFrame:
    """CPU seconds per request of the δ loop and the update, per run folder (Snakemake's benchmark files)."""
    rows = []
    for stage in ("optimize_memories", "update_weights"):
        for d in sorted(glob.glob(f"{folder}/benchmarks/{stage}/*/*/*")):
            jobs = [pd.read_csv(f, sep="\t").iloc[-1] for f in glob.glob(f"{d}/shard*.tsv")]
            if jobs:
                rows.append(
                    {
                        "stage": stage,
                        "run": Path(d).name,
                        "jobs": len(jobs),
                        "CPU s / job": sum(j.cpu_time for j in jobs) / len(jobs),
                    }
                )
    return pd.DataFrame(rows)


def budget(runs: list[dict]) -> pd.DataFrame:
    """Optimisation steps per request of each run: the δ loop's Adam updates (a window's trace rows less its
    stopping row), or the fine-tuning steps of ft / lora (their update's trace, one row per step)."""
    from muke.update.weights import WeightUpdate
    from muke.workflow.stages.common import read_update_index

    rows = []
    for run in runs:
        steps = []
        for shard in run["files"]["shards"]:
            if shard["trace"]:
                t = pd.read_parquet(shard["trace"])
                steps += list((t.groupby(["id", "window"]).size() - 1).groupby(level=0).sum())
            else:
                for entry in read_update_index(shard["update"]):
                    if entry["path"] is not None:
                        steps.append(len(WeightUpdate.load(entry["path"]).info["trace"]))
        if steps:
            rows.append(
                {
                    "method": run["method"],
                    "setting": run["setting"] or "–",
                    "requests": len(steps),
                    "steps / request (mean, max)": f"{sum(steps) / len(steps):.0f}, {max(steps)}",
                }
            )
    return pd.DataFrame(rows)


def main() -> None:
    png, folders = sys.argv[1], [read(a) for a in sys.argv[2:]]
    edit = pd.concat([labelled(pd.read_parquet(f / "tables/edit_metrics.parquet"), l) for f, l, _ in folders])
    loc = pd.concat([labelled(pd.read_parquet(f / "tables/locality.parquet"), l) for f, l, _ in folders])
    points = frontier_points(edit, loc)
    print(md(points.round(3)), "\n")
    records = pd.concat([per_record(*f) for f in folders], ignore_index=True)
    print(md(spread(records)), "\n")
    print(md(pd.concat([budget(runs) for _, _, runs in folders], ignore_index=True)), "\n")
    for f, _, _ in folders:
        c = cost(f)
        if len(c):
            print(md(c.round(0)), "\n")
    plot_frontier(points).savefig(png, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
