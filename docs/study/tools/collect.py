"""Every scored run under results/study: settings (from the manifests' chain) + paper-family metrics."""

import glob
import json
import sys

import pandas as pd

R = sys.argv[1] if len(sys.argv) > 1 else "results/study"


def man(stage, ident):
    for f in glob.glob(f"{R}/{stage}/**/manifest.json", recursive=True):
        if f"-{ident}/" in f:
            return json.load(open(f))
    return None


def delta_seconds(ident):
    rows = []
    for f in glob.glob(f"{R}/memories/**/*-{ident}/shard*.safetensors", recursive=True):
        from safetensors import safe_open

        with safe_open(f, framework="pt") as s:
            meta = json.loads(s.metadata()["muke"])
        recs = meta.get("requests") or []
        rows += [r.get("seconds", 0) for r in recs if r]
    return rows


out = []
for f in sorted(glob.glob(f"{R}/score/**/summary.parquet", recursive=True)):
    run = f.split("/")[-2]
    ds = f.split("/")[-3]
    m = json.load(open(f.replace("summary.parquet", "manifest.json")))
    g = man("generate", m["inputs"]["generate"])
    row = {"dataset": ds, "run": run, "method": run.rsplit("-", 1)[0]}
    if g and "update" in g["inputs"]:
        u = man("updates", g["inputs"]["update"])
        d = man("memories", u["inputs"]["memories"])
        row.update({k: v for k, v in d["params"]["memory"].items() if k not in ("objective",)})
        row.update({k: v for k, v in u["params"]["options"].items() if k not in ("keys",)})
        row["deltas_id"] = u["inputs"]["memories"]
        secs = delta_seconds(row["deltas_id"])
        row["delta_s_per_req"] = round(sum(secs) / max(len(secs), 1), 1)
    s = pd.read_parquet(f)
    for fam in ("paper", "standard"):
        for _, r in s[s.family == fam].iterrows():
            for met in ("bleu", "rouge_l", "bertscore"):
                row[f"{fam[:3]}_{r.kind[:4]}_{met}"] = round(r[met], 2)
    row["n"] = int(s["n"].max())
    out.append(row)
df = pd.DataFrame(out)
pd.set_option("display.width", 250)
pd.set_option("display.max_columns", 40)
cols = [c for c in df.columns if not c.startswith("sta_")]
print(df[cols].to_string())
df.to_csv("scratch/all_runs.csv", index=False)
