"""How much of the memory shift δ a MEMIT update writes into l_WM (not a test; a measurement).

    python benchmarks/delta_reach.py --model results/models/gemma3-<id> \
        --memories results/memories/gemma3/demo/muke-memit-<id>/shard0.safetensors \
        --stats results/stats/gemma3/L2-3-4-5-<id>.safetensors --layers 2 3 4 5 --mom2-update-weight 300
    python benchmarks/delta_reach.py --model ~/.cache/muke/models/gemma-3-270m --requests resources/demo_edits.jsonl \
        --ids demo-00 demo-01 demo-05 demo-06 --words 25 --v-lr 8 --steps 8 --stats-docs 300 \
        --layers 2 3 4 5 --mom2-update-weight 300

The first reads the workflow's memories and statistics; the second optimises μKE's δ here (matryoshka, window
20, clamp 8) on each answer's first --words words and collects the statistics on the first --stats-docs
documents of the demo corpus (cheaper, for a loaded machine).

δ is optimised in the residual stream at l_WM's output; on Gemma 2/3 the MLP output reaches it through
post_feedforward_layernorm. Per request (all its windows' hook positions together), with h the unedited output
of l_WM, z = h + δ the target and H the output after the update: reach = 1 - ‖z - H‖ / ‖δ‖ (1: δ reproduced,
0: no closer than before, < 0: further away) and along = ⟨H - h, δ⟩ / ‖δ‖² (the fraction of δ moved along its
own direction). Two updates: muke's (R mapped through the norm) and the llama-style one (R added to the
down-projection output as it is), same statistics and settings. Each request is edited alone (batch 1).
"""

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from muke.data import DEMO_CORPUS, load_requests
from muke.engine.memory import MemoryConfig, optimise_request
from muke.model import EditableModel, load
from muke.update.edit import compute_update
from muke.update.keys import Target, read_layer
from muke.update.stats import StatsConfig, collect_stats, load_stats
from muke.update.weights import apply
from muke.workflow.stages.update_weights import targets


def reach(em: EditableModel, target, layers, stats, mom2_update_weight, wm) -> tuple[float, float]:
    """(reach, along) of one request's MEMIT update made through `em`'s adapter."""
    pos = target.seq.hook_positions
    _, H0 = read_layer(em, wm, wm, target.seq.input_ids)
    h, delta = H0[pos], target.z - H0[pos]  # (n, d)
    update = compute_update(em, [target], "memit", layers, stats=stats, mom2_update_weight=mom2_update_weight)
    with apply(em, update):
        _, H1 = read_layer(em, wm, wm, target.seq.input_ids)
    moved = H1[pos] - h
    return (1 - (delta - moved).norm() / delta.norm()).item(), ((moved * delta).sum() / delta.pow(2).sum()).item()


def optimised_targets(em, args) -> list[Target]:
    """μKE's target memories z at l_WM for the chosen requests' shortened answers, optimised here."""
    cfg = MemoryConfig(
        layer=args.layers[-1], window=20, v_lr=args.v_lr, v_num_grad_steps=args.steps, clamp_norm_factor=8
    )
    chosen = [r for r in load_requests(args.requests, "jsonl") if r.id in args.ids]
    out = []
    for r in chosen:
        seq, res = optimise_request(em, r.question, " ".join(r.answer.split()[: args.words]), cfg)
        print(f"{r.id}: {seq.n_windows} windows, ||δ||/||h|| {(res.delta.norm(dim=-1) / res.h.norm(dim=-1)).tolist()}")
        out.append(Target(r.id, seq, res.z))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--memories", nargs="+", help="optimize_memories shard files of the workflow")
    ap.add_argument("--requests", help="else: a JSONL of requests whose δ is optimised here")
    ap.add_argument("--ids", nargs="+")
    ap.add_argument("--words", type=int, default=25)
    ap.add_argument("--v-lr", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--stats", help="a statistics file of --layers; else collected here on the demo corpus")
    ap.add_argument("--stats-docs", type=int, default=300)
    ap.add_argument("--layers", type=int, nargs="+", required=True)
    ap.add_argument("--mom2-update-weight", type=float, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    em = load(args.model)
    tgts = [t for path in args.memories for t in targets(path)[0]] if args.memories else optimised_targets(em, args)
    arms = {"through the norm": em}
    if em.adapter.post_mlp_norm:
        arms["llama-style"] = EditableModel(em.model, em.tokenizer, dataclasses.replace(em.adapter, post_mlp_norm=None))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = StatsConfig(layers=tuple(args.layers), corpus=str(DEMO_CORPUS), max_docs=args.stats_docs)
        path = args.stats or collect_stats(em, cfg, Path(tmp, "stats.safetensors"), progress=False)
        stats = load_stats(path, em, args.layers)
    print(f"{'request':10} {'update':18} {'reach':>7} {'along':>7}")
    for target in tgts:
        for name, editable in arms.items():
            r, a = reach(editable, target, args.layers, stats, args.mom2_update_weight, args.layers[-1])
            print(f"{target.id:10} {name:18} {r:7.3f} {a:7.3f}", flush=True)


if __name__ == "__main__":
    main()
