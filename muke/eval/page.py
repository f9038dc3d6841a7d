"""Pieces shared by the report's sections (muke.eval.report, .plots, .environment): the label and
metric columns of the result frames, and escaped HTML text, numbers, tables and notes."""

from __future__ import annotations

import html

import pandas as pd

LABELS = ["model", "dataset", "method", "setting"]
METRICS = {"bleu": "BLEU", "bertscore": "BERTScore", "rouge_l": "ROUGE-L"}


def esc(value) -> str:
    return html.escape(str(value))


def fmt(x) -> str:
    return "—" if pd.isna(x) else f"{x:.2f}"


def table(df: pd.DataFrame, text: bool = False) -> str:
    """An escaped HTML table (pandas escapes cell text and headers); `text`: left-aligned cells."""
    out = df.to_html(
        escape=True,
        border=0,
        na_rep="—",
        index=not isinstance(df.index, pd.RangeIndex),
        classes="text" if text else None,
    )
    return f"<div class='scroll'>{out}</div>"


def note(text: str) -> str:
    return f"<p class='note'>{esc(text)}</p>"


def sorted_values(values: pd.Series) -> list:
    """Values in numeric order where all are numbers, else in text order."""
    numeric = pd.to_numeric(values, errors="coerce")
    return list(values.iloc[numeric.argsort()] if numeric.notna().all() else values.sort_values())
