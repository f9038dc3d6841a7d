"""The study's figures (docs/study/*.png) from scratch tables made by collect.py / nll_probe.py.
Usage: plots.py ALL_RUNS.csv NLL.csv OUTDIR"""

import sys

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

matplotlib.use("Agg")

runs, nll, out = pd.read_csv(sys.argv[1]), pd.read_csv(sys.argv[2]), sys.argv[3]
sw = runs[runs.dataset == "sweep3"]
pre = sw[sw.method == "pre-edit"].iloc[0]
# 1: mom2_update_weight (μKE-MEMIT)
m = sw[(sw.method == "muke-memit") & (sw.v_num_grad_steps == 25)].sort_values("mom2_update_weight")
fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
for col, lab in (
    ("pap_ques_bleu", "question BLEU"),
    ("pap_para_bleu", "para BLEU"),
    ("pap_ques_rouge_l", "question ROUGE-L"),
):
    ax[0].plot(m.mom2_update_weight, m[col], "o-", label=lab)
ax[0].axhline(pre.pap_ques_bleu, ls=":", c="gray", label="pre-edit question BLEU")
ax[0].set_xscale("log")
ax[0].set_xlabel("mom2_update_weight")
ax[0].set_ylabel("paper family (char BLEU, R-L recall) ×100")
ax[0].set_title("μKE (MEMIT), δ: v_lr 2, 25 steps, clamp 8")
ax[0].legend(fontsize=7)
if "mom2_update_weight" in nll:
    n = nll.dropna(subset=["mom2_update_weight"]).groupby("mom2_update_weight")[["nll", "worst_lp"]].mean()
    ax[1].plot(n.index, n.nll, "o-", label="mean target NLL")
    ax[1].plot(n.index, -n.worst_lp, "s--", label="−worst token log-prob")
    ax[1].set_xscale("log")
    ax[1].set_xlabel("mom2_update_weight")
    ax[1].set_title("post-edit teacher-forced (mean of 3)")
    ax[1].legend(fontsize=7)
fig.tight_layout()
fig.savefig(f"{out}/mom2.png", dpi=120)
# 2: UnKE fine-tuning (unke_lr at 50 steps)
u = sw[sw.method == "muke-unke"].sort_values("lr")
if len(u):
    fig, ax = plt.subplots(figsize=(5, 3.4))
    x = range(len(u))
    w = 0.27
    for k, (col, lab) in enumerate(
        (("pap_ques_bleu", "question BLEU"), ("pap_para_bleu", "para BLEU"), ("pap_ques_rouge_l", "question ROUGE-L"))
    ):
        ax.bar([i + (k - 1) * w for i in x], u[col], w, label=lab)
    ax.axhline(pre.pap_ques_bleu, ls=":", c="gray", label="pre-edit question BLEU")
    ax.set_xticks(list(x))
    ax.set_xticklabels([f"unke_lr {v:g}" for v in u.lr])
    ax.set_ylim(0, 100)
    ax.set_ylabel("paper family ×100")
    ax.set_title("μKE (UnKE), 50 steps; δ: v_lr 2, 25 steps, clamp 8", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/unke.png", dpi=120)
# 3: final
f = runs[runs.dataset == "final"]
if len(f):
    order = [m for m in ["pre-edit", "anyedit-memit", "anyedit-unke", "muke-memit", "muke-unke"] if m in set(f.method)]
    f = f.set_index("method").loc[order]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    x = range(len(order))
    w = 0.27
    for k, (col, lab) in enumerate(
        (("pap_ques_bleu", "question BLEU"), ("pap_para_bleu", "para BLEU"), ("pap_ques_rouge_l", "question ROUGE-L"))
    ):
        ax.bar([i + (k - 1) * w for i in x], f[col], w, label=lab)
    ax.axhline(95, c="k", lw=0.6, ls="--")
    ax.axhline(85, c="k", lw=0.6, ls=":")
    ax.set_xticks(list(x))
    ax.set_xticklabels(order, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_title(f"final, {int(f.n.max())} held-out UnKEBench records (paper family)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}/final.png", dpi=120)
