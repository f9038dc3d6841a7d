"""Numerical failures: a non-finite loss, shift or update fails its request or batch, never the run."""

from __future__ import annotations

import torch


class NumericalError(RuntimeError):
    """A non-finite loss, shift or weight update: the request is recorded as failed, the run goes on."""


def check_finite(where: str, **tensors: torch.Tensor) -> None:
    """Raise NumericalError naming `where` and the first tensor that holds a NaN or an infinity."""
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise NumericalError(f"{where}: {name} is not finite")
