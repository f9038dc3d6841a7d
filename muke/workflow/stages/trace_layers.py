"""trace_layers: causal tracing of a dataset's requests (muke.locate.trace), its maps and layer band
(muke.locate.maps), for the report's "Layers" section."""

from __future__ import annotations

import sys
from pathlib import Path

from muke.workflow.stages.command import command
from muke.workflow.stages.common import load_model, log, shard_requests, write_manifest


@command(
    "causal tracing of the requests: effects, heat maps and a suggested layer band",
    requests="edit-requests file of the dataset",
    out="output folder",
    batch_size="restored runs per forward pass (never changes a result)",
)
def trace_layers(
    spec: dict, model: str | Path, requests: str | Path, out: str | Path, *, device: str = "auto", batch_size: int = 16
) -> Path:
    """effects.parquet, map.parquet, map_{component}.png and band.json in `out` (muke.locate.maps.write_trace)
    for the first `limit` requests of the dataset's selection (all with limit null)."""
    from muke.locate.maps import check_components, write_trace
    from muke.locate.trace import TraceConfig, trace

    p = spec["params"]
    check_components(p["components"])
    selection = {**p["selection"], "shard_size": p["limit"] or sys.maxsize}  # one shard: the first `limit`
    chosen = shard_requests(requests, selection, 0)
    em = load_model(model, p["dtype"], device)
    cfg = TraceConfig(
        noise=p["noise"],
        samples=p["samples"],
        seed=p["seed"],
        components=tuple(p["components"]),
        layers=None if p["layers"] is None else tuple(p["layers"]),
        batch_size=batch_size,
        max_target_tokens=p["max_target_tokens"],
    )
    effects = trace(em, chosen, cfg, p["window"], p["system_prompt"], p["chat_template"], progress=log)
    band = write_trace(effects, out, p["width"])
    log(f"suggested layers {band['layers']} (l_WM {band['l_wm']}): {band['rule']}")
    write_manifest(Path(out) / "manifest.json", spec)
    return Path(out)
