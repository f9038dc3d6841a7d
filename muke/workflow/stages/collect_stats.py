"""collect_stats: second moments of the down_proj inputs of the edited layers (muke.update.stats)."""

from __future__ import annotations

from pathlib import Path

from muke.workflow.stages.command import command
from muke.workflow.stages.common import load_model, write_manifest


@command("second moments of the down_proj inputs", corpus="text corpus file, or hf:NAME")
def collect_stats(
    spec: dict, model: str | Path, corpus: str, out: str | Path, *, device: str = "auto", checkpoint_every: int = 1000
) -> Path:
    """Second moments of the down_proj inputs of the spec's layers (resumes from `out`.partial)."""
    from muke.update import stats

    p = spec["params"]
    em = load_model(model, p["dtype"], device)
    cfg = stats.StatsConfig(
        layers=tuple(p["layers"]),
        corpus=corpus,
        max_docs=p["max_docs"],
        max_length=p["max_length"],
        seed=p["seed"],
        text_field=p["text_field"],
        batch_tokens=p["batch_tokens"],
        chat=p.get("chat", False),
        checkpoint_every=checkpoint_every,
        extra={"identity": spec["identity"]},
    )
    out = stats.collect_stats(em, cfg, out, progress=False)
    write_manifest(out.with_name(out.stem + ".manifest.json"), spec)
    return out
