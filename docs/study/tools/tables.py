"""Markdown tables of the study from collect.py's all_runs.csv and the probes' CSVs.
Usage: tables.py ALL_RUNS.csv NLL.csv DELTA.csv"""

import glob
import json
import sys

import pandas as pd

runs, nll, dl = pd.read_csv(sys.argv[1]), pd.read_csv(sys.argv[2]), pd.read_csv(sys.argv[3])
nll["update_id"] = nll.update_dir.str.rsplit("-", n=1).str[-1]


def md(df):
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        out.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out)


def upd(run_row):
    return None


def update_id(score_run, ds):
    m = json.load(open(glob.glob(f"results/study/score/smollm2/{ds}/{score_run}/manifest.json")[0]))
    g = json.load(open(glob.glob(f"results/study/generate/smollm2/{ds}/*-{m['inputs']['generate']}/manifest.json")[0]))
    return g["inputs"].get("update")


runs["update_id"] = [update_id(r.run, r.dataset) for r in runs.itertuples()]
agg = nll.groupby("update_id")[["nll", "worst_lp", "n_bad"]].mean().reset_index()
runs = runs.merge(agg, on="update_id", how="left")
cols = {
    "pap_ques_bleu": "Q BLEU",
    "pap_para_bleu": "Para BLEU",
    "pap_ques_rouge_l": "Q R-L",
    "pap_para_rouge_l": "Para R-L",
    "sta_ques_bleu": "Q BLEU (std)",
    "sta_ques_rouge_l": "Q R-L F1 (std)",
    "nll": "target NLL",
    "worst_lp": "worst tok lp",
    "n_bad": "tokens p<0.5",
    "delta_s_per_req": "δ s/req",
}
for ds, key, meth in (("sweep3", "mom2_update_weight", "muke-memit"), ("sweep3", "lr", "muke-unke")):
    d = runs[(runs.dataset == ds) & (runs.method.isin([meth, "pre-edit"]))].copy()
    d = d.sort_values(key, na_position="last")
    d[key] = [("pre-edit" if m == "pre-edit" else f"{v:g}") for m, v in zip(d.method, d[key])]
    print(f"\n### {meth}: {key}\n")
    print(md(d[[key] + [c for c in cols if c in d]].rename(columns=cols)))
d = runs[runs.dataset == "final"]
if len(d):
    print("\n### final\n")
    print(md(d[["method"] + [c for c in cols if c in d]].rename(columns=cols)))
print("\n### δ alone (shifts hooked, no weight edit)\n")
print(
    md(
        dl.groupby(["deltas", "layer"])[["pre_nll", "pre_worst", "delta_nll", "delta_worst", "delta_n_bad", "seconds"]]
        .mean()
        .reset_index()
    )
)
