"""Percentile-bootstrap confidence intervals of means over edit requests, for claims such as
"method A scores higher than method B".

The unit resampled is the REQUEST: a request's several rows (sub-questions, families stored apart) are
averaged first, so a request with many rows weighs as much as one with a single row and does not make
the interval narrower than the number of requests allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

N_BOOT, LEVEL, SEED = 2000, 0.95, 0
# For captions: what an interval of `with_intervals` with the defaults is.
DESCRIPTION = (
    f"{LEVEL:.0%} percentile-bootstrap interval over requests (a request's rows averaged first; "
    f"{N_BOOT} resamples, seed {SEED})"
)


def bootstrap_ci(
    values: Sequence[float], n_boot: int = N_BOOT, level: float = LEVEL, seed: int = SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of the mean of `values`.

    `n_boot` resamples of len(values) values drawn with replacement (numpy Generator seeded with `seed`,
    so equal inputs give equal intervals); low/high are the (1 - level)/2 and (1 + level)/2 quantiles of
    the resampled means. NaN values are ignored, as pandas' mean ignores them; no value left gives
    (nan, nan); one value v gives (v, v).
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # (n_boot,)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def with_intervals(
    per_sample: pd.DataFrame,
    by: list[str],
    metrics: list[str],
    unit: str = "id",
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = SEED,
) -> pd.DataFrame:
    """One row per group of `by`: n_units, and for each metric its mean, `{metric}_ci_low`, `{metric}_ci_high`.

    Rows of one `unit` (request) within a group are averaged first; the group's mean and interval are
    then those of these per-request means (see `bootstrap_ci`), i.e. the mean over requests, not over
    rows. n_units: requests in the group. `by` may be empty (one row for the whole frame).
    """
    missing = [c for c in [*by, unit, *metrics] if c not in per_sample]
    if missing:
        raise KeyError(f"per_sample has no columns {missing}")
    per_unit = per_sample.groupby([*by, unit], sort=True, dropna=False)[metrics].mean().reset_index()
    groups = per_unit.groupby(by, sort=True, dropna=False) if by else [((), per_unit)]
    out = []
    for key, group in groups:
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row["n_units"] = len(group)
        for m in metrics:
            row[m] = group[m].mean()
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = bootstrap_ci(group[m].to_numpy(), n_boot, level, seed)
        out.append(row)
    columns = [*by, "n_units"] + [c for m in metrics for c in (m, f"{m}_ci_low", f"{m}_ci_high")]
    return pd.DataFrame(out, columns=columns)


def separated(a_low: float, a_high: float, b_low: float, b_high: float) -> bool:
    """Whether intervals [a_low, a_high] and [b_low, b_high] do not overlap (False if any bound is NaN).

    A conservative test for an ordering claim: separated 95 % intervals imply a difference of means at a
    level stricter than 5 %; overlapping ones do not prove the means equal.
    """
    return bool(a_high < b_low or b_high < a_low)
