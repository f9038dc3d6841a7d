"""Efficacy against locality for one δ and several update settings (study 4 of docs/STUDY-smollm2.md).

For each request: optimise δ once per `--steps` value, then for each value of the backend option in
`--grid` (e.g. mom2_update_weight=300,1000,3000) compute the weight update and measure, on the edited
weights (no hooks): teacher-forced target NLL / worst-token log-prob / tokens with p < 0.5, greedy
question and paraphrase char BLEU, answer retention on the unrelated questions (char BLEU, exact
match against the unedited model's answers), KL / perplexity shift on held-out texts, ‖ΔW‖ / ‖W‖.
One CSV row per (request, steps, grid value); rows already in OUT are skipped (resumable); each δ is
kept beside OUT (OUT.memories/) and reused, the retention pairs go to OUT.samples.jsonl.

  python docs/study/tools/locality_probe.py MODEL_DIR REQUESTS FORMAT OUT.csv --ids 2 3 \
      --method muke-memit --steps 25 50 --grid mom2_update_weight=300,1000,3000,15000
"""

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from muke.data import DEMO_CORPUS, load_requests_checked
from muke.engine.memory import MemoryConfig, encode_request, optimise_request
from muke.eval.generate import greedy
from muke.eval.metrics import char_bleu
from muke.eval.retention import answer_retention, held_out_texts, text_shift, unrelated_questions
from muke.model import load
from muke.update.edit import compute_update
from muke.update.keys import Target
from muke.update.methods import resolve_method
from muke.update.stats import StatsConfig, cached_stats
from muke.update.weights import apply
from muke.workflow.config import load_preset

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("requests")
p.add_argument("format")
p.add_argument("out")
p.add_argument("--ids", nargs="+", required=True)
p.add_argument("--method", default="muke-memit")
p.add_argument("--preset", default="smollm2-135m-instruct")
p.add_argument("--steps", nargs="+", type=int, default=[25])
p.add_argument("--grid", required=True, help="backend option=v1,v2,...")
p.add_argument("--set", nargs="*", default=[], help="preset overrides key=value")
p.add_argument("--threads", type=int, default=1)
args = p.parse_args()
torch.set_num_threads(args.threads)

em = load(args.model, "float32", "cpu")
preset = load_preset(args.preset)[1]["hparams"]
for kv in args.set:
    k, v = kv.split("=")
    preset[k] = type(preset[k])(v) if k in preset else float(v)
key, values = args.grid.split("=")
values = [float(v) for v in values.split(",")]
requests = {str(r.id): r for r in load_requests_checked(args.requests, args.format, "error")[0]}
questions = [r["question"] for r in unrelated_questions()]
texts = held_out_texts(32, DEMO_CORPUS)
pre_answers = [g.text for g in greedy(em, questions, max_new_tokens=64, batch_size=32)]
done = set()
rows = []
if os.path.exists(args.out):
    rows = pd.read_csv(args.out).to_dict("records")
    done = {(str(r["id"]), r["method"], r["steps"], r["key"], r["value"]) for r in rows}


@torch.no_grad()
def target_logprobs(seq):
    logits = em.model(input_ids=seq.input_ids, use_cache=False).logits[0]
    t = torch.tensor(seq.target_ids)
    return F.log_softmax(logits[seq.target_positions].float(), -1).gather(1, t[:, None])[:, 0]


def weight_ratio(update) -> float:
    """max over layers of ‖ΔW‖_F / ‖W‖_F (MEMIT factors: ΔW = A Bᵀ)."""
    out = 0.0
    for layer, (a, b) in (update.factors or {}).items():
        w = em.down_proj(int(layer)).weight
        out = max(out, (a.float() @ b.float().T).norm().item() / w.norm().item())
    return out


def memories(r, cfg, steps):
    """(seq, MemoryResult) of one request, optimised once and kept in OUT.memories/."""
    kept = Path(args.out + ".memories") / f"{r.id}-{args.method}-{steps}.pt"
    seq = encode_request(em, r.question, r.answer, cfg)
    if kept.exists():
        return seq, torch.load(kept, weights_only=False)
    kept.parent.mkdir(exist_ok=True)
    seq, result = optimise_request(em, r.question, r.answer, cfg)
    torch.save(result, kept)
    return seq, result


for rid in args.ids:
    r = requests[rid]
    for steps in args.steps:
        todo = [v for v in values if (rid, args.method, steps, key, v) not in done]
        if not todo:
            continue
        memory, backend, options = resolve_method(args.method, {**preset, "v_num_grad_steps": steps})
        cfg = MemoryConfig(**memory)
        seq, result = memories(r, cfg, steps)
        stats = None
        if backend != "unke":
            stats = cached_stats(em, StatsConfig(layers=tuple(options["layers"]), corpus=str(DEMO_CORPUS)))
        n_new = len(seq.target_ids) + 40
        for v in todo:
            start = time.perf_counter()
            update = compute_update(
                em, [Target(rid, seq, result.z)], backend, stats=stats, method=args.method, **{**options, key: v}
            )
            seconds = time.perf_counter() - start
            with apply(em, update):
                lp = target_logprobs(seq)
                q, para = (g.text for g in greedy(em, [r.question, r.para_question], max_new_tokens=n_new))
                post = [g.text for g in greedy(em, questions, max_new_tokens=64, batch_size=32)]
            shift = text_shift(em, texts, update)
            ret = answer_retention(pre_answers, post)
            rows.append(
                dict(
                    id=rid,
                    method=args.method,
                    steps=steps,
                    key=key,
                    value=v,
                    delta_seconds=result.seconds,
                    update_seconds=seconds,
                    nll=-lp.mean().item(),
                    worst_lp=lp.min().item(),
                    n_bad=int((lp < -0.693).sum()),
                    q_bleu=char_bleu(q, r.answer),
                    para_bleu=char_bleu(para, r.answer),
                    retention_char_bleu=ret["char_bleu"],
                    retention_exact=ret["exact_match"],
                    kl=shift["kl"],
                    ppl_pre=shift["ppl_pre"],
                    ppl_post=shift["ppl_post"],
                    dw_ratio=weight_ratio(update),
                )
            )
            print(rows[-1], flush=True)
            with open(args.out + ".samples.jsonl", "a") as f:
                for x in ret["rows"]:
                    f.write(json.dumps({"id": rid, "steps": steps, key: v, "q": q, **x}) + "\n")
            pd.DataFrame(rows).to_csv(args.out, index=False)
