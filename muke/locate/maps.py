"""Causal-tracing effects as layer × position-group maps, the layer band they suggest, and the files.

`effect_map` pools the requests: the share of the clean log-probability a restoration brings back is
Σ_requests (lp_restored − lp_corrupted) / Σ_requests (lp_clean − lp_corrupted), for the first window and
for the whole answer (muke.locate.trace). Pooling the differences, not averaging per-request shares,
keeps a request that noise barely hurts (a near-zero denominator) from dominating.

The suggested band (`suggest_band`) reads ROME's finding (Meng et al. 2022, §2.2) that the decisive
states sit at the subject's tokens up to the middle layers, after which attention moves the information
to the positions that answer, and MEMIT's choice (2023, §4) of the edited MLPs as a run of layers ending
there. Here the subject is the question: l_WM is the last layer of the first run of layers at which
restoring the hidden states of the question tokens still brings back at least `threshold` (half) of the
clean log-probability of the first window (the target of δ_1); the band is the `width` traced layers
ending at l_WM. Single-layer MLP restorations are no guide on their own: the noise stays in the residual
stream, so restoring one MLP output brings little back (except where that output swamps the embeddings,
as layer 0's can); ROME restores windows of MLP layers for that reason.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from muke.io import atomic_path, write_json, write_parquet
from muke.locate.trace import COMPONENTS, GROUPS

MEASURES = {"window": "first window", "answer": "whole answer"}
BAND_RULE = (
    "the {width} layers ending at the last layer before restoring the question tokens' hidden states "
    "brings back less than {threshold:g} of the clean log-prob ({measure})"
)


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


def check_components(components) -> None:
    """The band is read from the hidden states: a trace that leaves them out cannot suggest one."""
    if "hidden" not in components:
        raise ValueError(f"trace components {list(components)}: the layer band needs 'hidden'")


def suggest_band(effects_map: pd.DataFrame, width: int = 5, threshold: float = 0.5, measure: str = "window") -> dict:
    """{layers, l_wm, rule, curve}: the band of `width` traced layers ending at l_WM (module docstring);
    `curve`: the hidden-state effect at the question tokens per traced layer."""
    part = effects_map[(effects_map["component"] == "hidden") & (effects_map["group"] == "question")]
    curve = part.set_index("layer")[f"recovered_{measure}"].sort_index()
    if curve.empty:
        raise ValueError("no hidden-state effects at the question tokens to choose a band from")
    layers = list(curve.index)
    below = [k for k, value in enumerate(curve) if value < threshold]
    end = max(below[0] - 1, 0) if below else len(layers) - 1
    band = [int(x) for x in layers[max(end - width + 1, 0) : end + 1]]
    rule = BAND_RULE.format(width=len(band), threshold=threshold, measure=MEASURES[measure])
    return {"layers": band, "l_wm": band[-1], "rule": rule, "curve": {int(k): float(v) for k, v in curve.items()}}


def plot_maps(effects_map: pd.DataFrame, component: str):
    """The heat maps of one component: layers across, position groups down, one panel per measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = effects_map[effects_map["component"] == component]
    groups = [g for g in GROUPS if g in set(part["group"])]
    n = int(part["n_requests"].max())
    fig, axes = plt.subplots(len(MEASURES), 1, figsize=(max(6.0, 0.28 * part["layer"].nunique() + 2), 4.6))
    for ax, (m, label) in zip(axes, MEASURES.items()):
        grid = part.pivot(index="group", columns="layer", values=f"recovered_{m}").reindex(groups)
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="Purples", vmin=min(0.0, grid.min().min()))
        ax.set_yticks(range(len(groups)), groups)
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns], fontsize=7)
        ax.set_title(f"{component}: share of the clean log-prob restored, {label} (n = {n} requests)", fontsize=9)
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
    band = {**suggest_band(emap, width), "n_requests": int(effects["id"].nunique())}
    write_json(out / "band.json", band)
    return band
