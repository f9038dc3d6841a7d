"""Per-arm means of benchmarks/integrity_probe.py's JSON lines, as the markdown table of
docs/study/smollm2-8-integrity.md.

    python docs/study/tools/integrity_table.py [--ids 30 31 32 33] docs/study/integrity/*.jsonl
"""

import json
import statistics
import sys
from pathlib import Path

COLUMNS = [
    ("q_bleu", "Q char BLEU", 1),
    ("para_bleu", "para char BLEU", 1),
    ("repetition", "repetition", 2),
    ("target_repetition", "(target)", 2),
    ("first_agreement", "first-token agreement %", 1),
    ("first_kl", "first-token KL", 2),
    ("token_agreement", "token agreement %", 1),
    ("prefix_exact", "32-token exact %", 1),
    ("seconds", "s / edit", 0),
]


def cell(rows: list[dict], key: str, digits: int) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{statistics.fmean(values):.{digits}f}" if values else "–"


def main() -> None:
    args, ids = sys.argv[1:], None
    if args[0] == "--ids":
        cut = next(i for i, a in enumerate(args) if a.endswith(".jsonl"))
        ids, args = set(args[1:cut]), args[cut:]
    rows = [json.loads(line) for path in args for line in Path(path).read_text().splitlines()]
    rows = [r for r in rows if ids is None or str(r["id"]) in ids]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r.get("method", "–")), []).append(r)
    print("| arm | method | records | " + " | ".join(name for _, name, _ in COLUMNS) + " |")
    print("|" + "---|" * (3 + len(COLUMNS)))
    for (arm, method), mine in groups.items():
        ids = ", ".join(sorted({str(r["id"]) for r in mine}, key=int))
        print(f"| {arm} | {method} | {ids} | " + " | ".join(cell(mine, k, d) for k, _, d in COLUMNS) + " |")


if __name__ == "__main__":
    main()
