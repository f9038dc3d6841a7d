"""Dataset loader for muke's local lm-eval tasks: JSONL splits named relative to this folder."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_files: dict, **_metadata) -> datasets.DatasetDict:
    """{split: relative JSONL path} → DatasetDict (lm-eval also passes the task metadata; it is unused)."""
    return datasets.load_dataset("json", data_files={split: str(HERE / path) for split, path in data_files.items()})
