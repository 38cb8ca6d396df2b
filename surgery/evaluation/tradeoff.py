"""Patched models measured in memory, with one load of each checkpoint: what `select` and the study compare.

The source is loaded and scored, then freed; the target is loaded once, scored, and each patched state
(a ranking's top K, or every module, blended at alpha) is swapped into it, scored, and undone bit for
bit (`swap.swapped`). Scores are per row, so Recovery (on the task) and Retention (on a keep set) get
paired intervals. Teacher-forced sets cost one forward pass each: the trade-off curve of a transplant
(Recovery against Retention, over K and alpha) costs seconds to minutes where accuracy costs hours.

`choose_point` is `select`'s rule on such a curve: the smallest K (and alpha) that recovers enough of
the task while keeping enough of what the target gained.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from surgery.analysis.workloads import PromptSet
from surgery.checkpoints.folder import Checkpoint
from surgery.checkpoints.loading import load_tokenizer, with_model
from surgery.checkpoints.options import ModelOptions
from surgery.checkpoints.swap import swapped
from surgery.evaluation.keep import keep_nll
from surgery.manifest import CurvePoint, KeepPoint

# What a loaded model is scored with: (model, tokenizer) -> per-row scores by set name.
Scorer = Callable[[Any, Any], dict[str, list[float]]]
SOURCE, TARGET = "source", "target"
VALIDATION = "validation"  # the task set a curve's Recovery is measured on (`select`'s validation problems)


@dataclass(frozen=True)
class Patched:
    """One patched model, measured in memory: `tensors` of the source blended into the target at `alpha`
    (1: copied). `label` names it in the scores; `k` is its K (None for a selection not made by K)."""

    label: str
    tensors: tuple[str, ...]
    alpha: float = 1.0
    k: int | None = None


def measure_patched(
    source: Checkpoint,
    target: Checkpoint,
    states: Sequence[Patched],
    score: Scorer,
    options: ModelOptions,
    *,
    known: Mapping[str, dict[str, list[float]]] | None = None,
    on_scored: Callable[[str, dict[str, list[float]]], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Score the source, the target, and the target with each state swapped in, one model in memory at a time.

    Args:
        source, target: the checkpoints.
        states: the patched models (labels unique, neither "source" nor "target").
        score: what each model is scored with.
        options: how the models are loaded and prompted.
        known: scores measured before, by label: those models are not measured again (a model whose every
            label is known is not even loaded), so a long measurement resumes where it stopped.
        on_scored: called with each label and its scores as soon as they are measured (to save them).

    Returns:
        {"source": scores, "target": scores, state.label: scores, ...}, each `score(model, tokenizer)`.
    """
    labels = [s.label for s in states]
    assert len(set(labels)) == len(labels) and not {SOURCE, TARGET} & set(labels), labels
    result = {k: v for k, v in (known or {}).items() if k in {SOURCE, TARGET, *labels}}

    def scored(label: str, lm, tokenizer) -> None:
        result[label] = score(lm, tokenizer)
        if on_scored is not None:
            on_scored(label, result[label])

    def run(ckpt: Checkpoint, work: Callable[[Any, Any], None]) -> None:
        ckpt.check_config()
        tokenizer = load_tokenizer(ckpt.path, options.trust_remote_code)
        with_model(ckpt.path, options, lambda lm: work(lm, tokenizer))

    todo = [s for s in states if s.label not in result]

    def on_target(lm, tokenizer) -> None:
        if TARGET not in result:
            scored(TARGET, lm, tokenizer)
        for i, state in enumerate(todo, 1):
            with swapped(lm, source, list(state.tensors), alpha=state.alpha):
                scored(state.label, lm, tokenizer)
            if options.progress:
                print(f"  measured {state.label} ({i}/{len(todo)})", file=sys.stderr, flush=True)

    if SOURCE not in result:
        run(source, lambda lm, tok: scored(SOURCE, lm, tok))
    if todo or TARGET not in result:
        run(target, on_target)
    return result


def nll_scorer(sets: Mapping[str, PromptSet], chat: bool) -> Scorer:
    """Per-row teacher-forced NLL on each set, a workload with solutions (`keep.keep_nll`)."""

    def score(lm, tokenizer) -> dict[str, list[float]]:
        return {name: keep_nll(lm, tokenizer, workload, chat) for name, workload in sets.items()}

    return score


def _regressed(r: KeepPoint) -> bool:
    """A keep set where the target has no advantage (Retention undefined) and the patched model's keep NLL rose
    above the target's beyond noise (the change's 95% interval is above 0): the regression check."""
    return r.pct is None and r.nll_change_ci95[0] > 0


def _kept(point: CurvePoint, min_retention: float | None) -> bool:
    """Whether every keep set keeps at least `min_retention` % of the target's advantage, or, where the target
    has none to keep (Retention undefined), shows no keep NLL rise beyond noise."""
    if min_retention is None:
        return True
    return all(not _regressed(r) if r.pct is None else r.pct >= min_retention for r in point.retention)


def _least_kept(point: CurvePoint) -> float:
    return min((r.pct for r in point.retention if r.pct is not None), default=float("inf"))


def _keeping(point: CurvePoint) -> tuple[int, float]:
    """How much a point keeps, for "the point that keeps the most": fewer regressions first, then the least
    Retention over its keep sets."""
    return -sum(_regressed(r) for r in point.retention), _least_kept(point)


def _where(point: CurvePoint) -> str:
    return f"K={point.k}" + (f", alpha {point.alpha:g}" if point.alpha != 1 else "")


def percent(value: float | None) -> str:
    """A percentage as select and its rule print it: `57.7%`, or `undefined`."""
    return f"{value:.1f}%" if value is not None else "undefined"


def choose_point(
    curve: Sequence[CurvePoint], min_recovery: float, min_retention: float | None, metric: str
) -> tuple[CurvePoint, str, bool]:
    """`select`'s rule: the smallest K (at that K, the alpha that keeps the most of the target) whose Recovery
    reaches `min_recovery` while every keep set's Retention stays >= `min_retention`.

    When no point does, the best trade-off is taken and the rule says why: the highest Recovery among the
    points that keep `min_retention`, or, when none keeps it, the point that keeps the most.

    Returns:
        (the point, the rule in words, whether it met both bars).
    """
    undefined = any(r.pct is None for p in curve for r in p.retention)
    check = " (where it is undefined, no keep NLL rise beyond noise)" if undefined else ""
    keeps = f" while Retention stays >= {min_retention:g}%{check}" if min_retention is not None else ""
    met = [p for p in curve if p.recovery is not None and p.recovery >= min_recovery and _kept(p, min_retention)]
    if met:
        k = min(p.k for p in met)
        chosen = max((p for p in met if p.k == k), key=lambda p: (_least_kept(p), -p.alpha))
        alphas = " (and the alpha keeping the most of the target)" if len({p.alpha for p in curve}) > 1 else ""
        rule = f"smallest K{alphas} with Recovery >= {min_recovery:g}% of the {metric} gap{keeps}"
        rule += " on the validation problems"
        return chosen, rule, True
    kept = [p for p in curve if _kept(p, min_retention)]
    if kept:
        chosen = max(kept, key=lambda p: p.recovery if p.recovery is not None else float("-inf"))
        rule = (
            f"no K reached {min_recovery:g}% Recovery of the {metric} gap{keeps}; the best Recovery"
            f"{' that keeps it' if keeps else ''} ({percent(chosen.recovery)} at {_where(chosen)}) was taken"
        )
    else:
        chosen = max(curve, key=_keeping)
        regressed = ", ".join(r.keep for r in chosen.retention if _regressed(r))
        rule = (
            f"no point keeps {min_retention:g}% Retention{check}; "
            f"the one that keeps the most ({percent(_least_kept(chosen))} at {_where(chosen)}, Recovery "
            f"{percent(chosen.recovery)}{f'; keep NLL rose on {regressed}' if regressed else ''}) was taken"
        )
    return chosen, rule, False
