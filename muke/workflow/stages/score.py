"""score: per-answer metrics of both families (muke.eval.metrics) and their summary."""

from __future__ import annotations

from pathlib import Path

from muke.eval.fluency import FLUENCY_COLUMNS, fluency_columns
from muke.io import write_parquet
from muke.workflow.stages.command import command
from muke.workflow.stages.common import log, model_path, write_manifest

METRICS = ["bleu", "rouge_l", "bertscore"]


def _summary(scored):
    """Per question kind × metric family: the mean over requests of each request's mean (the
    paper's averaging of sub-questions) with its bootstrap interval over requests (`{m}_ci_low`,
    `{m}_ci_high`: muke.eval.intervals.with_intervals), the fluency columns averaged alike (where the
    samples have them); n = requests, n_samples = answers."""
    import pandas as pd

    from muke.eval.intervals import with_intervals

    keys = ["kind", "family"]
    means = METRICS + [c for c in FLUENCY_COLUMNS if c in scored]
    per_request = scored.groupby([*keys, "id"], sort=False)[means].mean()
    summary = per_request.groupby(level=keys, sort=False).mean()
    summary["n"] = per_request.groupby(level=keys, sort=False).size()
    summary["n_samples"] = scored.groupby(keys, sort=False).size()
    summary["edit_failed"] = scored.groupby(keys, sort=False)["edit_failed"].sum()
    bounds = [f"{m}_ci_{side}" for m in METRICS for side in ("low", "high")]
    intervals = with_intervals(scored, keys, METRICS, unit="id")[keys + bounds]
    return pd.DataFrame(summary).reset_index().merge(intervals, on=keys, how="left")


@command("metrics of both families and their summary", model="prepared model folder (its tokenizer)")
def score(
    spec: dict,
    generations: list[str | Path],
    samples: str | Path,
    summary: str | Path,
    model: str | Path,
    *,
    device: str = "auto",
) -> Path:
    """Per-answer metrics of both families (muke.eval.metrics.score_frame) and their summary. Each sample
    also gets `target_tokens`, the target's length in the model's tokens (the x axis of the paper's
    BLEU vs length figure), and the fluency of the answer and of its target (muke.eval.fluency:
    ngram_entropy, repetition, target_ngram_entropy, target_repetition)."""
    import pandas as pd
    from transformers import AutoTokenizer

    from muke.eval.metrics import score_frame

    p = spec["params"]
    df = pd.concat([pd.read_parquet(g) for g in generations], ignore_index=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path(model))
    targets = df["target"].unique().tolist()
    lengths = dict(zip(targets, map(len, tokenizer(targets, add_special_tokens=False)["input_ids"])))
    df["target_tokens"] = df["target"].map(lengths)
    frame = df.rename(columns={"output": "generated"}).drop(columns=["prompt"])
    log(f"scoring {len(frame)} answers ({', '.join(p['families'])})")
    scored = score_frame(
        frame,
        p["families"],
        batch_size=p["batch_size"],
        num_layers=p["num_layers"],
        device=None if device == "auto" else device,
    )
    scored = scored.merge(df[["id", "kind", "index", "output", "target"]], on=["id", "kind", "index"], how="left")
    scored = scored.assign(**fluency_columns(scored["output"].tolist(), scored["target"].tolist()))
    write_parquet(scored, samples)
    write_parquet(_summary(scored), summary)
    write_manifest(Path(summary).parent / "manifest.json", spec)
    return Path(summary)
