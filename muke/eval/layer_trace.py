"""The report's "Layers" section: the causal-tracing heat maps and the suggested layer band of each traced
model × dataset (stage trace_layers, muke.locate.maps)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from muke.eval.page import esc

CAPTION = (
    "Causal tracing (ROME, on long-form answers): the question's embeddings are corrupted with noise and one "
    "state per layer and position group is restored from the clean run; each cell is the share of the clean "
    "log-probability of the answer (first window / whole answer) that the restoration brings back, pooled over "
    "the traced requests. The band is MEMIT's choice on these maps."
)


def layers_section(entries: list[dict]) -> list[str]:
    """HTML parts: per entry ({model, dataset, path}: a trace_layers folder) its band and its maps."""
    parts = ["<h2 id='layers'>Layers (causal tracing)</h2>", f"<p class='caption'>{esc(CAPTION)}</p>"]
    for entry in entries:
        folder = Path(entry["path"])
        band = json.loads((folder / "band.json").read_text())
        parts += [
            f"<h3>{esc(entry['model'])} · {esc(entry['dataset'])}</h3>",
            f"<p>Suggested layers <b>{esc(band['layers'])}</b>, l_WM {band['l_wm']}: {esc(band['rule'])}; "
            f"{band['n_requests']} requests.</p>",
        ]
        for png in sorted(folder.glob("map_*.png")):
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img alt='{esc(png.stem)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(png.stem.removeprefix('map_'))}: layers across, position groups down."
                "</figcaption></figure>"
            )
    return parts
