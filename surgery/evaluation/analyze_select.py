"""`analyze --auto-k`: rank a pair, then choose K on held-out problems, into one manifest.

Here rather than in `analysis.analyze`, because choosing K evaluates (the analysis layer may not import
evaluation).
"""

from __future__ import annotations

from pathlib import Path

from surgery.analysis.analyze import analyze
from surgery.checkpoints.options import ModelOptions
from surgery.evaluation.select import SelectResult, check_auto_k, choose_k


def analyze_and_select(
    workload: str,
    validation: str,
    out: str | Path,
    *,
    source: str | Path,
    target: str | Path,
    method: str = "taylor",
    seed: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_memory: str | None = None,
    ks: str | None = None,
    min_recovery: float = 90.0,
    metric: str = "nll",
    options: ModelOptions | None = None,
    overwrite: bool = False,
) -> SelectResult:
    """`analyze` the pair on `workload`, then `select` K on `validation`, and write one manifest with both.

    Everything `select` would refuse is refused before the (slow) ranking starts, so that a refusal never
    leaves a manifest without its K.

    Args:
        workload, out, source, target, method, seed, max_new_tokens, batch_size, max_memory: as in `analyze`.
        validation, ks, min_recovery, metric: as in `select` (`batch_size` is its batch size too).
        options: how the models are loaded and prompted, for both steps; default `ModelOptions()`.
        overwrite: replace an existing `out` and the PNG of the curve beside it.

    Returns:
        What `select` wrote: the ranked manifest with its `selection`, the curve's table and plot.

    Raises:
        SurgeryError: as `analyze` and `select`.
    """
    options = options or ModelOptions()
    out = Path(out)
    check_auto_k(
        workload,
        validation,
        out,
        source=source,
        target=target,
        ks=ks,
        min_recovery=min_recovery,
        metric=metric,
        overwrite=overwrite,
        options=options,
    )
    analyze(
        workload,
        out,
        source=source,
        target=target,
        method=method,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_memory=max_memory,
        options=options,
        overwrite=overwrite,
    )
    return choose_k(
        out,
        validation,
        out,
        source=source,
        target=target,
        ks=ks,
        min_recovery=min_recovery,
        metric=metric,
        batch_size=batch_size,
        options=options,
        overwrite=True,  # the manifest `analyze` just wrote, now with its K
    )
