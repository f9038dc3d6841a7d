"""The result rows of `muke edit` (made by muke.result): their text form, results.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def describe(row: dict) -> str:
    """A row as the text `muke edit` prints without --json."""
    lines = [
        f"[{row['id']}] {row['method']}  {row['seconds']:.1f} s",
        f"  question : {row['question']}",
        f"  target   : {row['target']}",
        f"  pre-edit : {row['generated_pre']}",
        f"  post-edit: {row['generated']}",
        f"  BLEU {row['bleu_pre']:.1f} -> {row['bleu']:.1f}   ROUGE-L recall {row['rouge_l_pre']:.1f} -> "
        f"{row['rouge_l']:.1f}   target NLL {row['nll_pre']:.3f} -> {row['nll_post']:.3f}   "
        "(paper family: character BLEU, rouge ROUGE-L recall)",
    ]
    if "own_bleu" in row:
        lines.insert(
            5,
            f"  right after its own batch (batch {row['batch'] + 1}): BLEU "
            f"{row['own_bleu']:.1f}, target NLL {row['nll_own']:.3f}; post-edit = after all {row['n_edits']}",
        )
    if "para_question" in row:
        lines += [
            f"  paraphrase: {row['para_question']}",
            f"  post-edit : {row['para_generated']}",
            f"  BLEU {row['para_bleu']:.1f}   ROUGE-L recall {row['para_rouge_l']:.1f}",
        ]
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
