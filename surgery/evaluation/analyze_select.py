"""`surgery analyze`: rank a pair (on the source's own answers with --solutions source), and with --auto-k choose K
on held-out problems, into one manifest.

Here rather than in `analysis.analyze`, because choosing K evaluates (the analysis layer may not import
evaluation), as do the source's answers of `--solutions source`.
"""

from __future__ import annotations

from pathlib import Path

from surgery.analysis.analyze import analyze
from surgery.checkpoints.options import ModelOptions
from surgery.evaluation.select import SelectResult, check_auto_k, choose_k
from surgery.evaluation.solutions import ranking_workload
from surgery.manifest import Manifest


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
    solutions: str | None = None,
    keep: str | None = None,
    min_retention: float | None = None,
) -> SelectResult:
    """`analyze` the pair on `workload`, then `select` K on `validation`, and write one manifest with both.

    Everything `select` would refuse is refused before the (slow) ranking starts, so that a refusal never
    leaves a manifest without its K.

    Args:
        workload, out, source, target, method, seed, max_new_tokens, batch_size, max_memory: as in `analyze`.
        validation, ks, min_recovery, metric: as in `select` (`batch_size` is its batch size too, and
            `max_new_tokens` its decoding budget: every answer the command generates has the one budget).
        options: how the models are loaded and prompted, for both steps; default `ModelOptions()`.
        overwrite: replace an existing `out` and the PNG of the curve beside it.
        solutions: `source` to rank on the source's own correct answers to the workload's problems instead of
            its gold solutions (`solutions.ranking_workload`), and, with `metric` `nll`, to choose K on its correct
            answers to the validation problems (as `select` does).
        keep: a keep workload: `taylor` and `swap-nll` trade the task against it (as `analyze`), and `select`
            measures each K's Retention on it, choosing with `min_retention` (as `select --keep`).

    Returns:
        What `select` wrote: the ranked manifest with its `selection`, the curve's table and plot.

    Raises:
        SurgeryError: as `analyze` and `select`.
    """
    options = options or ModelOptions()
    out = Path(out)
    validation_solutions = solutions if metric == "nll" else None  # accuracy grades each model's own answers
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
        solutions=validation_solutions,
        keep=keep,
        min_retention=min_retention,
    )
    analyze_on(
        workload,
        out,
        solutions=solutions,
        source=source,
        target=target,
        method=method,
        seed=seed,
        keep=keep,
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
        max_new_tokens=max_new_tokens,
        options=options,
        overwrite=True,  # the manifest `analyze` just wrote, now with its K
        solutions=validation_solutions,
        keep=(keep,) if keep is not None else (),
        min_retention=min_retention,
    )


def analyze_on(
    workload: str,
    out: str | Path,
    *,
    solutions: str | None,
    source: str | Path,
    target: str | Path,
    method: str,
    seed: int | None,
    keep: str | None,
    max_new_tokens: int,
    batch_size: int,
    max_memory: str | None,
    options: ModelOptions,
    overwrite: bool,
) -> Manifest:
    """`analyze` on `workload`, or with `solutions="source"` on the source's own correct answers to its problems
    (`solutions.ranking_workload`: generated once, cached): what `surgery analyze` runs, with or without --auto-k."""
    ranked_on = ranking_workload(
        workload,
        solutions,
        out,
        source=source,
        method=method,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        options=options,
        overwrite=overwrite,
    )
    return analyze(
        ranked_on,
        out,
        source=source,
        target=target,
        method=method,
        seed=seed,
        keep=keep,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_memory=max_memory,
        options=options,
        overwrite=overwrite,
    )
