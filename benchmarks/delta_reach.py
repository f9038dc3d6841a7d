"""How much of the memory shift δ a MEMIT update writes into l_WM (not a test; a measurement on workflow outputs).

    python benchmarks/delta_reach.py --model results/models/gemma3-<id> \
        --memories results/memories/gemma3/demo/muke-memit-<id>/shard0.safetensors \
        --stats results/stats/gemma3/L2-3-4-5-<id>.safetensors --layers 2 3 4 5 --mom2-update-weight 300

δ is optimised in the residual stream at l_WM's output; on Gemma 2/3 the MLP output reaches it through
post_feedforward_layernorm. Per request (all its windows' hook positions together), with h the unedited output
of l_WM, z = h + δ the target and H the output after the update: reach = 1 - ‖z - H‖ / ‖δ‖ (1: δ reproduced,
0: no closer than before, < 0: further away) and along = ⟨H - h, δ⟩ / ‖δ‖² (the fraction of δ moved along its
own direction). Two updates: muke's (R mapped through the norm) and the llama-style one (R added to the
down-projection output as it is), same statistics and settings. Each request is edited alone (batch 1).
"""

import argparse
import dataclasses

import torch

from muke.model import EditableModel, load
from muke.update.edit import compute_update
from muke.update.keys import read_layer
from muke.update.stats import load_stats
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--memories", required=True, nargs="+")
    ap.add_argument("--stats", required=True)
    ap.add_argument("--layers", type=int, nargs="+", required=True)
    ap.add_argument("--mom2-update-weight", type=float, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    em = load(args.model)
    stats = load_stats(args.stats, em, args.layers)
    arms = {"through the norm": em}
    if em.adapter.post_mlp_norm:
        arms["llama-style"] = EditableModel(em.model, em.tokenizer, dataclasses.replace(em.adapter, post_mlp_norm=None))
    print(f"{'request':10} {'update':18} {'reach':>7} {'along':>7}")
    for path in args.memories:
        for target in targets(path)[0]:
            for name, editable in arms.items():
                r, a = reach(editable, target, args.layers, stats, args.mom2_update_weight, args.layers[-1])
                print(f"{target.id:10} {name:18} {r:7.3f} {a:7.3f}", flush=True)


if __name__ == "__main__":
    main()
