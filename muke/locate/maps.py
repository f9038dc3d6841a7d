"""Causal-tracing effects as layer × position-group maps, the layer band they suggest, and the files.

`effect_map` pools the requests: the share of the clean log-probability a restoration brings back is
Σ_requests (lp_restored − lp_corrupted) / Σ_requests (lp_clean − lp_corrupted), for the first window and
for the whole answer (muke.locate.trace). Pooling the differences, not averaging per-request shares,
keeps a request that noise barely hurts (a near-zero denominator) from dominating.

The suggested band (`suggest_band`) follows MEMIT (Meng et al. 2023, §4): it edits the MLPs of a run
of consecutive layers where restoring the MLP output at the subject tokens matters most, and reads the
working memory at the run's last layer. Here the subject is the question: the band is the `width`
consecutive layers with the largest summed `mlp` effect at the `question` group on the first window's
log-probability (the target of δ_1), ties to the lower band; l_WM is its last layer.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from muke.io import atomic_path, write_json, write_parquet
from muke.locate.trace import COMPONENTS, GROUPS

MEASURES = {"window": "first window", "answer": "whole answer"}
BAND_RULE = "the {width} consecutive layers of largest summed {component} effect at the {group} tokens ({measure})"


def effect_map(effects: pd.DataFrame) -> pd.DataFrame:
    """One row per (component, layer, group): recovered_{window,answer} pooled over requests, n_requests."""
    gain = {f"gain_{m}": effects[f"{m}_logp"] - effects[f"corrupted_{m}_logp"] for m in MEASURES}
    drop = {f"drop_{m}": effects[f"clean_{m}_logp"] - effects[f"corrupted_{m}_logp"] for m in MEASURES}
    frame = effects[["component", "layer", "group", "id"]].assign(**gain, **drop)
    sums = frame.groupby(["component", "layer", "group"]).agg(
        n_requests=("id", "nunique"), **{k: (k, "sum") for k in [*gain, *drop]}
    )
    for m in MEASURES:
        sums[f"recovered_{m}"] = sums[f"gain_{m}"] / sums[f"drop_{m}"]
    return sums[["n_requests", *(f"recovered_{m}" for m in MEASURES)]].reset_index()


def suggest_band(
    effects_map: pd.DataFrame, width: int = 5, component: str = "mlp", group: str = "question", measure: str = "window"
) -> dict:
    """{layers, l_wm, rule}: the band of `width` consecutive traced layers (module docstring)."""
    curve = (
        effects_map[(effects_map["component"] == component) & (effects_map["group"] == group)]
        .set_index("layer")[f"recovered_{measure}"]
        .sort_index()
    )
    if curve.empty:
        raise ValueError(f"no {component} effects at the {group} group to choose a band from")
    width = min(width, len(curve))
    sums = curve.rolling(width).sum().dropna()
    end = int(sums.idxmax())
    layers = [int(x) for x in curve.index[curve.index <= end][-width:]]
    rule = BAND_RULE.format(width=width, component=component, group=group, measure=MEASURES[measure])
    return {"layers": layers, "l_wm": layers[-1], "rule": rule, "score": float(sums.max())}


def plot_maps(effects_map: pd.DataFrame, component: str):
    """The heat maps of one component: layers across, position groups down, one panel per measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = effects_map[effects_map["component"] == component]
    groups = [g for g in GROUPS if g in set(part["group"])]
    fig, axes = plt.subplots(len(MEASURES), 1, figsize=(max(6.0, 0.28 * part["layer"].nunique() + 2), 4.6))
    for ax, (m, label) in zip(axes, MEASURES.items()):
        grid = part.pivot(index="group", columns="layer", values=f"recovered_{m}").reindex(groups)
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="Purples", vmin=min(0.0, grid.min().min()))
        ax.set_yticks(range(len(groups)), groups)
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns], fontsize=7)
        ax.set_title(f"{component}: share of the clean log-prob restored, {label}", fontsize=9)
        fig.colorbar(image, ax=ax)
    axes[-1].set_xlabel("layer")
    fig.tight_layout()
    return fig


def write_trace(effects: pd.DataFrame, out: str | Path, width: int = 5) -> dict:
    """effects.parquet (per request and restoration), map.parquet (`effect_map`), one PNG per component
    (map_{component}.png) and band.json (`suggest_band`) in folder `out`; returns the band."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    emap = effect_map(effects)
    write_parquet(effects, out / "effects.parquet")
    write_parquet(emap, out / "map.parquet")
    for component in [c for c in COMPONENTS if c in set(emap["component"])]:
        fig = plot_maps(emap, component)
        with atomic_path(out / f"map_{component}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
    component = "mlp" if "mlp" in set(emap["component"]) else emap["component"].iloc[0]
    band = {**suggest_band(emap, width, component), "n_requests": int(effects["id"].nunique())}
    write_json(out / "band.json", band)
    return band
