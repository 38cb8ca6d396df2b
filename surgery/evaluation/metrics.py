"""Accuracy intervals and the transplant metrics (TIR, Recovery) with paired bootstrap intervals."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def wilson_interval(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion.

    Args:
        correct: successes.
        total: trials (0 gives the uninformative interval (0, 1)).
        z: the normal quantile; the default gives 95%.

    Returns:
        (low, high).
    """
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # At 0 and at n the formula reaches the bound only up to rounding (2.8e-17 for 0 of 6); it is exact.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def tir(acc_patched: float, acc_target: float) -> float | None:
    """Transplant improvement ratio acc(P)/acc(T); None when acc(T) is 0."""
    return acc_patched / acc_target if acc_target > 0 else None


def recovery(acc_patched: float, acc_target: float, acc_source: float) -> float | None:
    """Share of the source-target gap closed, in percent; None when the gap is 0.

    Works for any score, higher or lower is better (accuracy, or gold NLL where lower is better).
    """
    gap = acc_source - acc_target
    # `+ 0.0` turns -0.0 (no change over a negative gap) into 0.0, so it never prints as "-0.0".
    return 100.0 * (acc_patched - acc_target) / gap + 0.0 if gap != 0 else None


def paired_bootstrap(
    source: Sequence[float], target: Sequence[float], patched: Sequence[float], samples: int = 2000, seed: int = 0
) -> dict[str, tuple[float, float] | None]:
    """95% percentile intervals of TIR and Recovery, resampling problems jointly.

    Per-problem scores are correctness (bools) for accuracy, or gold NLLs for NLL recovery.

    The three runs answer the same problems, so each resample draws problem indices once
    and applies them to all three: the intervals reflect which problems were drawn, not
    three independent draws. Resamples where a metric is undefined are skipped; an interval
    is None when more than half of them were.
    """
    n = len(target)
    rng = random.Random(seed)
    tirs, recs = [], []
    for _ in range(samples):
        idx = [rng.randrange(n) for _ in range(n)]
        s, t, p = (sum(xs[i] for i in idx) / n for xs in (source, target, patched))
        if (v := tir(p, t)) is not None:
            tirs.append(v)
        if (v := recovery(p, t, s)) is not None:
            recs.append(v)
    return {"tir": _percentiles(tirs, samples), "recovery": _percentiles(recs, samples)}


def mean_interval(values: Sequence[float], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (e.g. per-problem differences)."""
    n = len(values)
    rng = random.Random(seed)
    means = [sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples)]
    interval = _percentiles(means, samples)
    assert interval is not None  # every resample has a mean
    return interval


def _percentiles(values: list[float], samples: int) -> tuple[float, float] | None:
    if len(values) < samples / 2:
        return None
    values = sorted(values)
    return values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]
