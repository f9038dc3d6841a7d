"""Markdown tables of a final comparison run: question / paraphrase metrics with 95 % bootstrap intervals
(the report's edit_metrics.parquet), per-record spread of question BLEU (score samples), and CPU seconds
per request of each stage (the workflow's benchmark files, per shard job / requests in the shard).

  python docs/study/tools/final_tables.py results/study final [PLOT.png]

With PLOT.png: per-record question BLEU of each method (dots) with its mean and 95 % interval (bars).
"""

import glob
import sys

import pandas as pd

root, dataset = sys.argv[1], sys.argv[2]
m = pd.read_parquet(f"{root}/tables/edit_metrics.parquet")
m = m[(m.dataset == dataset) & (m.family == "paper")]
rows = []
for method, g in m.groupby("method", sort=False):
    q, p = (g[g.kind == k].iloc[0] for k in ("question", "para_question"))
    rows.append(
        {
            "method": method,
            "n": int(q.n),
            "Q BLEU [95% CI]": f"{q.bleu:.1f} [{q.bleu_ci_low:.1f}, {q.bleu_ci_high:.1f}]",
            "Para BLEU [95% CI]": f"{p.bleu:.1f} [{p.bleu_ci_low:.1f}, {p.bleu_ci_high:.1f}]",
            "Q R-L": f"{q.rouge_l:.1f}",
            "Q MiniLM": f"{q.bertscore:.1f}",
        }
    )


def md(df: pd.DataFrame) -> str:
    out = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(out)


print(md(pd.DataFrame(rows)), "\n")

spread, per_record = [], {}
for f in sorted(glob.glob(f"{root}/score/*/{dataset}/*/samples.parquet")):
    s = pd.read_parquet(f)
    s = s[(s.family == "paper") & (s.kind == "question")]
    method = f.split("/")[-2].rsplit("-", 1)[0]
    b = s.bleu
    per_record[method] = b.to_numpy()
    spread.append(
        {
            "method": method,
            "records": len(b),
            "≥ 95": int((b >= 95).sum()),
            "≥ 85": int((b >= 85).sum()),
            "< 50": int((b < 50).sum()),
            "median": f"{b.median():.1f}",
            "min": f"{b.min():.1f}",
        }
    )
print(md(pd.DataFrame(spread)), "\n")

cost = []
for stage in ("optimize_memories", "update_weights", "generate"):
    for d in sorted(glob.glob(f"{root}/benchmarks/{stage}/*/{dataset}/*")):
        jobs = [pd.read_csv(f, sep="\t").iloc[-1] for f in glob.glob(f"{d}/shard*.tsv")]
        if not jobs:
            continue
        cost.append(
            {
                "stage": stage,
                "method": d.split("/")[-1].rsplit("-", 1)[0],
                "jobs": len(jobs),
                "job wall s (mean)": f"{sum(j.s for j in jobs) / len(jobs):.0f}",
                "job CPU s (mean)": f"{sum(j.cpu_time for j in jobs) / len(jobs):.0f}",
            }
        )
print(md(pd.DataFrame(cost)))

# The δ budget each method used: Adam updates per request (a window's trace rows less its stopping row) and
# windows that stopped at the step cap instead of by the loss / v_stop_prob rule (the traces, via the report spec).
spec_path = f"{root}/report/spec.json"
if glob.glob(spec_path):
    import json
    import math

    budget = []
    for run in json.load(open(spec_path))["runs"]:
        shards = run["files"]["shards"]
        if run["dataset"] != dataset or not shards:
            continue
        memory = run["settings"]["memory"]
        t = pd.concat([pd.read_parquet(s["trace"]) for s in shards])
        per_window = t.groupby(["id", "window"]).agg(rows=("step", "size"), worst=("worst_logp", "last"))
        capped = per_window.rows == memory["v_num_grad_steps"]
        stop = memory.get("v_stop_prob")
        budget.append(
            {
                "method": run["method"],
                "cap": memory["v_num_grad_steps"],
                "v_stop_prob": stop,
                "updates / request (mean)": f"{(per_window.rows - 1).groupby(level=0).sum().mean():.0f}",
                "updates / window (mean, max)": f"{(per_window.rows - 1).mean():.1f}, {(per_window.rows - 1).max()}",
                "windows at the cap": f"{int(capped.sum())} / {len(per_window)}",
                "windows ending below p": "–" if stop is None else f"{int((per_window.worst < math.log(stop)).sum())}",
            }
        )
    print("\n" + md(pd.DataFrame(budget)))

if len(sys.argv) > 3:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = m[m.kind == "question"].set_index("method")
    order = [r["method"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for x, method in enumerate(order):
        ys = per_record[method]
        ax.scatter([x + 0.08 * ((i % 5) - 2) for i in range(len(ys))], ys, s=12, alpha=0.6)
        r = q.loc[method]
        ax.errorbar(x + 0.3, r.bleu, yerr=[[r.bleu - r.bleu_ci_low], [r.bleu_ci_high - r.bleu]], fmt="o", color="k")
    ax.set_xticks(range(len(order)), order)
    ax.set_ylabel("question char BLEU (paper)")
    ax.set_title(f"{dataset}: per record (dots), mean and 95 % bootstrap interval (bars)")
    fig.tight_layout()
    fig.savefig(sys.argv[3], dpi=120)

loc_path = f"{root}/tables/locality.parquet"
if glob.glob(loc_path):
    loc = pd.read_parquet(loc_path)
    loc = loc[loc.dataset.isin([dataset, None]) | loc.dataset.isna()]
    shown = []
    for method, g in loc.groupby("method", sort=False):
        row = {
            "method": method,
            "edits": int(g[g.model_state == "edited"].n.max()) if (g.model_state == "edited").any() else 0,
        }
        for r in g.itertuples():
            scale = 1 if r.task == "text_shift" else 100
            err = "" if pd.isna(r.stderr) else f" ± {r.stderr * scale:.2g}"
            row[r.metric] = f"{r.value * scale:.3g}{err}"
        shown.append(row)
    print("\n" + md(pd.DataFrame(shown).fillna("")))
