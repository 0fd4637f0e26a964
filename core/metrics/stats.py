"""Paired comparisons of two methods with a bootstrap interval (Efron & Tibshirani, 1993).

Two methods run on the same (target, seed) pairs give paired differences ``d``; their mean is reported
with a percentile-bootstrap 95 % interval (resampling the pairs), and the counts of wins, ties and losses.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def bootstrap_ci(d, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``d`` (resampling its entries with replacement).

    NaN for fewer than two entries: one difference says nothing about its spread (every resample would equal
    it, an interval of width 0 that "excludes 0" whenever the one difference is not 0)."""
    d = np.asarray(d, dtype=np.float64)
    if len(d) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def paired(a, b, tie: float = 1e-9, **kw) -> dict[str, Any]:
    """``a - b`` over paired entries: mean, bootstrap 95 % interval, wins / ties / losses of ``a``."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return {"mean_diff": float(d.mean()) if len(d) else float("nan"), "ci95": list(bootstrap_ci(d, **kw)),
            "wins": int((d > tie).sum()), "ties": int((np.abs(d) <= tie).sum()), "losses": int((d < -tie).sum()),
            "n": int(len(d))}


def excludes_zero(ci) -> bool:
    return bool(ci[0] > 0 or ci[1] < 0)


def kendall(a, b) -> float:
    """Kendall's tau-b between two sequences (scipy), NaN when it is undefined (a constant sequence)."""
    from scipy.stats import kendalltau

    t = kendalltau(np.asarray(a, dtype=float), np.asarray(b, dtype=float)).statistic
    return float(t) if np.isfinite(t) else float("nan")
