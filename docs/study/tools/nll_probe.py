"""Post-edit teacher-forced target NLL (mean) and worst-token log-prob, per request, for every
update_weights shard under a results folder. Usage: nll_probe.py RESULTS MODEL_DIR DATASET_JSON OUT.csv"""

import glob
import os
import sys
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from muke.data import load_requests_checked
from muke.engine.windows import encode
from muke.update.weights import WeightUpdate, apply
from muke.workflow.stages.common import load_model, read_update_index

torch.set_num_threads(1)

results, model_dir, data, out = sys.argv[1:5]
em = load_model(model_dir, "float32", "cpu")
reqs = {r.id: r for r in load_requests_checked(data, "unkebench", "error")[0]}
done = set()
rows = []
if os.path.exists(out):
    import pandas as pd

    old = pd.read_csv(out)
    rows = old.to_dict("records")
    done = set(old["update_dir"])


@torch.no_grad()
def lp(seq):
    logits = em.model(input_ids=seq.input_ids, use_cache=False).logits[0]
    t = torch.tensor(seq.target_ids)
    l = F.log_softmax(logits[seq.target_positions].float(), -1).gather(1, t[:, None])[:, 0]
    return l


for idx in sorted(glob.glob(f"{results}/updates/**/shard*.parquet", recursive=True)):
    d = str(Path(idx).parent)
    if d in done:
        continue
    for row in read_update_index(idx):
        if row["path"] is None:
            continue
        delta = WeightUpdate.load(row["path"])
        for rid in row["request_ids"]:
            r = reqs.get(rid) or reqs.get(str(rid))
            if r is None:
                continue
            seq = encode(em.tokenizer, r.question, r.answer, em.end_of_turn, None, None, True)
            with apply(em, delta):
                l = lp(seq)
            rows.append(
                {
                    "update_dir": d,
                    "id": rid,
                    "nll": -l.mean().item(),
                    "worst_lp": l.min().item(),
                    "n_bad": int((l < -0.7).sum()),
                }
            )
            print(rows[-1], flush=True)

pd.DataFrame(rows).to_csv(out, index=False)
