"""δ-only teacher-forced NLL / worst token log-prob (shifts hooked at l_WM, no weight edit), and the
unedited model's, per request of every deltas shard. Usage: delta_probe.py RESULTS MODEL_DIR OUT.csv"""

import glob
import json
import sys

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open

from muke.engine import hooks
from muke.workflow.stages.common import load_model

torch.set_num_threads(1)


results, model_dir, out = sys.argv[1:4]
em = load_model(model_dir, "float32", "cpu")
rows = []


@torch.no_grad()
def lp(ids, n_prompt, tgt):
    logits = em.model(input_ids=ids[None], use_cache=False).logits[0]
    pos = torch.arange(n_prompt - 1, n_prompt - 1 + len(tgt))
    return F.log_softmax(logits[pos].float(), -1).gather(1, tgt[:, None])[:, 0]


for f in sorted(glob.glob(f"{results}/memories/**/shard*.safetensors", recursive=True)):
    man = json.load(open(f.rsplit("/", 1)[0] + "/manifest.json"))
    mem = man["params"]["memory"]
    with safe_open(f, framework="pt") as s:
        meta = json.loads(s.metadata()["muke"])
        t = {k: s.get_tensor(k) for k in s.keys()}
    for k, rec in enumerate(meta["requests"]):
        if rec.get("failed"):
            continue
        p, tg = t[f"{k}.prompt_ids"], t[f"{k}.target_ids"]
        ids = torch.cat([p, tg])[:-1]
        base = lp(ids, len(p), tg)
        with hooks.shifts(em.layer(mem["layer"]), t[f"{k}.positions"].tolist(), list(t[f"{k}.delta"])):
            sh = lp(ids, len(p), tg)
        rows.append(
            {
                "deltas": f.split("/")[-2],
                "id": rec["id"],
                "layer": mem["layer"],
                "v_lr": mem["v_lr"],
                "steps": mem["v_num_grad_steps"],
                "clamp": mem["clamp_norm_factor"],
                "window": mem["window"],
                "objective": mem["objective"],
                "seconds": rec["seconds"],
                "pre_nll": -base.mean().item(),
                "pre_worst": base.min().item(),
                "delta_nll": -sh.mean().item(),
                "delta_worst": sh.min().item(),
                "delta_n_bad": int((sh < -0.7).sum()),
            }
        )
        print(rows[-1], flush=True)

pd.DataFrame(rows).to_csv(out, index=False)
