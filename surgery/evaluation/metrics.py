"""Accuracy intervals and the transplant metrics (TIR, Recovery, Retention) with paired bootstrap intervals."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from surgery.errors import SurgeryError


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
    # The ratio first, so that a patched score equal to the source's is exactly 100 (not 100 times x, over x).
    # `+ 0.0` turns -0.0 (no change over a negative gap) into 0.0, so it never prints as "-0.0".
    return 100.0 * ((acc_patched - acc_target) / gap) + 0.0 if gap != 0 else None


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


@dataclass(frozen=True)
class Retention:
    """How much of the target's advantage over the source on a keep set W a patched model keeps.

    From per-row keep NLLs (nats per token) s (source), t (target), p (patched), on the `rows` all three
    scored: `pct` = 100 * mean(s - p) / mean(s - t), so 100% is the target itself and 0% a full rollback
    to the source. Where the target has no advantage on W (`advantage`, mean(s - t), is not above 0, or its
    95% interval reaches 0), a share of it means nothing: `pct` and `ci95` are None, `undefined` says why,
    and `nll_change`, mean(p - t), is the measure instead (a regression check: above 0 is worse than the
    target). Every interval is a paired bootstrap over the same resampled rows.
    """

    pct: float | None
    ci95: tuple[float, float] | None
    nll_change: float
    nll_change_ci95: tuple[float, float]
    advantage: float
    advantage_ci95: tuple[float, float]
    undefined: str | None
    rows: int

    def to_dict(self) -> dict:
        return asdict(self)


def retention(
    source: Sequence[float], target: Sequence[float], patched: Sequence[float], samples: int = 2000, seed: int = 0
) -> Retention:
    """Retention % on a keep set, from per-row keep NLLs of the source, target and patched model (same rows).

    Rows any of the three has no NLL for (NaN: nothing scored) are left out.

    Raises:
        SurgeryError: the lists differ in length, or no row has an NLL in all three.
    """
    if not len(source) == len(target) == len(patched):
        raise SurgeryError(
            f"keep NLLs of {len(source)}, {len(target)} and {len(patched)} rows; measure all three on the same rows"
        )
    rows = [i for i in range(len(target)) if all(x[i] == x[i] for x in (source, target, patched))]  # drops NaN
    if not rows:
        raise SurgeryError("no keep row has an NLL in all three models; use a keep set of longer texts")
    s, t, p = ([x[i] for i in rows] for x in (source, target, patched))
    advantage = [a - b for a, b in zip(s, t, strict=True)]
    change = [a - b for a, b in zip(p, t, strict=True)]
    # The same seed draws the same resampled rows in every interval, so they describe one bootstrap.
    adv, adv_ci = _mean(advantage), mean_interval(advantage, samples, seed)
    undefined = None
    if adv <= 0 or adv_ci[0] <= 0:
        undefined = f"target has no advantage: source - target {adv:+.3f} nats [{adv_ci[0]:+.3f}, {adv_ci[1]:+.3f}]"
    # Retention is Recovery with source and target swapped: the share of the way from the source back to the target.
    pct = recovery(_mean(p), _mean(s), _mean(t))
    return Retention(
        pct=None if undefined else pct,
        ci95=None if undefined else paired_bootstrap(t, s, p, samples, seed)["recovery"],
        nll_change=_mean(change),
        nll_change_ci95=mean_interval(change, samples, seed),
        advantage=adv,
        advantage_ci95=adv_ci,
        undefined=undefined,
        rows=len(rows),
    )


def describe(r: Retention, workload: str | None = None) -> str:
    """Retention as report, sweep, select and the demo print it: "Retention 87.5% [70.1, 99.0] on W", or where
    it is undefined "keep NLL +0.012 nats [-0.003, 0.027] on W (target has no advantage: ...)"."""
    on = f" on {workload}" if workload else ""
    if r.pct is None:
        lo, hi = r.nll_change_ci95
        return f"keep NLL {r.nll_change:+.3f} nats [{lo:+.3f}, {hi:+.3f}]{on} ({r.undefined})"
    band = f" [{r.ci95[0]:.1f}, {r.ci95[1]:.1f}]" if r.ci95 else ""
    return f"Retention {r.pct:.1f}%{band}{on}"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
