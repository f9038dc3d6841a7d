"""Bootstrap intervals: coverage on a known distribution, determinism, resampling of requests not rows."""

import math

import numpy as np
import pandas as pd
import pytest

from muke.eval.intervals import bootstrap_ci, separated, with_intervals


def test_coverage_of_the_true_mean():
    """~95 % of intervals from 200 samples of an exponential (mean 1, skewed) contain 1."""
    rng = np.random.default_rng(123)
    hits = [
        lo <= 1.0 <= hi for lo, hi in (bootstrap_ci(rng.exponential(1.0, 50), n_boot=1000, seed=s) for s in range(200))
    ]
    assert 0.88 <= np.mean(hits) <= 0.99  # percentile bootstrap under-covers slightly at n = 50


def test_interval_brackets_the_mean_and_narrows_with_level():
    x = np.random.default_rng(0).normal(10.0, 2.0, 40)
    lo95, hi95 = bootstrap_ci(x)
    lo50, hi50 = bootstrap_ci(x, level=0.5)
    assert lo95 < lo50 < x.mean() < hi50 < hi95


def test_deterministic_per_seed():
    x = np.random.default_rng(1).normal(size=30)
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(list(x), seed=7)
    assert bootstrap_ci(x, seed=7) != bootstrap_ci(x, seed=8)


def test_empty_one_value_and_nan():
    assert all(math.isnan(b) for b in bootstrap_ci([]))
    assert all(math.isnan(b) for b in bootstrap_ci([math.nan]))
    assert bootstrap_ci([3.5]) == (3.5, 3.5)
    assert bootstrap_ci([1.0, math.nan, 3.0]) == bootstrap_ci([1.0, 3.0])


def frame(n_requests=20, rows_per_request=None, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for method, shift in (("memit", 0.0), ("muke", 30.0)):
        for i in range(n_requests):
            k = rows_per_request(i) if rows_per_request else 1
            value = 40.0 + shift + rng.normal(0, 10)
            out += [dict(method=method, id=f"r{i}", bleu=value, rouge_l=value / 2)] * k
    return pd.DataFrame(out)


def test_with_intervals_columns_and_means():
    df = frame()
    out = with_intervals(df, ["method"], ["bleu", "rouge_l"])
    assert list(out.columns) == [
        "method",
        "n_units",
        "bleu",
        "bleu_ci_low",
        "bleu_ci_high",
        "rouge_l",
        "rouge_l_ci_low",
        "rouge_l_ci_high",
    ]
    assert out["method"].tolist() == ["memit", "muke"] and out["n_units"].tolist() == [20, 20]
    means = df.groupby("method")["bleu"].mean()
    assert np.allclose(out["bleu"], means.loc[out["method"]].to_numpy())
    assert (out["bleu_ci_low"] < out["bleu"]).all() and (out["bleu"] < out["bleu_ci_high"]).all()
    a, b = out.iloc[0], out.iloc[1]
    assert separated(a.bleu_ci_low, a.bleu_ci_high, b.bleu_ci_low, b.bleu_ci_high)


def test_rows_of_one_request_are_averaged_before_resampling():
    one = with_intervals(frame(), ["method"], ["bleu"])
    # every request repeated 1..4 times: the requests, hence the interval, are unchanged
    repeated = with_intervals(frame(rows_per_request=lambda i: 1 + i % 4), ["method"], ["bleu"])
    pd.testing.assert_frame_equal(one, repeated)
    # sub-question rows of one request: the request counts once, with its rows' mean
    df = pd.DataFrame(dict(id=["a", "a", "a", "b"], bleu=[0.0, 0.0, 30.0, 50.0]))
    out = with_intervals(df, [], ["bleu"])
    assert out["n_units"].tolist() == [2] and out["bleu"].tolist() == [30.0]


def test_missing_columns():
    with pytest.raises(KeyError, match="bleu"):
        with_intervals(pd.DataFrame(dict(id=["a"])), [], ["bleu"])


def test_separated():
    assert separated(0, 1, 2, 3) and separated(2, 3, 0, 1)
    assert not separated(0, 2, 1, 3)
    assert not separated(math.nan, math.nan, 0, 1)
