"""μKE: Matryoshka Unstructured Knowledge Editing and its baselines for Hugging Face causal LMs.

The public Python API is what `__all__` names (README.md, "Python API"); everything else may change.
`import muke` stays light: each name is imported on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "Editor": "muke.editor",
    "EditResult": "muke.result",
    "EditRequest": "muke.data",
    "DataError": "muke.data",
    "ModelError": "muke.model",
    "WeightUpdate": "muke.update.weights",
    "load_requests": "muke.data",
    "export_model": "muke.model_card",
}
__all__ = [
    "DataError",
    "EditRequest",
    "EditResult",
    "Editor",
    "ModelError",
    "WeightUpdate",
    "__version__",
    "export_model",
    "load_requests",
]

if TYPE_CHECKING:
    from muke.data import DataError, EditRequest, load_requests
    from muke.editor import Editor
    from muke.model import ModelError
    from muke.model_card import export_model
    from muke.result import EditResult
    from muke.update.weights import WeightUpdate


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'muke' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
