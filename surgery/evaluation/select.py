"""Choose K on held-out problems: `surgery select`.

For each K, the top K modules of a manifest are swapped into the loaded target in memory (as `sweep`
does) and measured on validation problems that the ranking never saw: gold-solution NLL (`nll`, the
default, one teacher-forced pass per K) or accuracy (`accuracy`, greedy generation and grading, as
`eval` does). Recovery is measured against both baselines, the source and the target, with a paired
bootstrap interval. The smallest K whose Recovery reaches `min_recovery` is chosen; if none does, the
best K, and the rule says so. When the baselines' own gap is within noise, no K is chosen from it.

A validation workload of prompts already rendered (`surgery solutions` writes one) is scored as it is
(`nll` only: its prompts cannot be asked again as problems). With `solutions="source"`, the validation
becomes the source's own correct answers to its problems (`solutions.source_solutions`, cached): the NLL
of answering as the source does, rather than of imitating the gold solutions.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from surgery.analysis.workloads import PromptSet, load_workload, require_solutions
from surgery.checkpoints.candidates import find_candidates
from surgery.checkpoints.folder import Checkpoint, open_checkpoint
from surgery.checkpoints.loading import load_tokenizer
from surgery.checkpoints.options import ModelOptions
from surgery.errors import SurgeryError
from surgery.evaluation.benchmarks import STOP_STRINGS, Benchmark, grade, prompt_messages, prompt_text
from surgery.evaluation.generate import greedy_generate, render
from surgery.evaluation.k_grid import parse_alphas, parse_ks
from surgery.evaluation.keep import keep_nll, keep_sets
from surgery.evaluation.metrics import Retention, mean_interval, paired_bootstrap, recovery, retention
from surgery.evaluation.solutions import (
    check_solver,
    find_cached,
    solution_problems,
    source_solutions,
    workload_benchmark,
)
from surgery.evaluation.tradeoff import VALIDATION, Patched, choose_point, measure_patched, nll_scorer, percent
from surgery.fileio import check_new_file
from surgery.manifest import (
    CurvePoint,
    KeepPoint,
    Manifest,
    Selection,
    Workload,
    check_ranked_for,
    load_manifest,
    save_manifest,
    select_modules,
)

METRICS = ("nll", "accuracy")


@dataclass(frozen=True)
class SelectResult:
    """What `select` wrote.

    Attributes:
        manifest: the manifest written, with its `selection`.
        out: where it was written.
        plot: the PNG of the curve, beside it.
        table: the curve as a markdown table, the chosen K marked (`curve_table`).
    """

    manifest: Manifest
    out: Path
    plot: Path
    table: str

    @property
    def selection(self) -> Selection:
        """The K chosen, and how."""
        assert self.manifest.selection is not None  # select always writes one
        return self.manifest.selection


@dataclass(frozen=True)
class _Validation:
    """The validation set as measured: the workload, and its problems where `eval`'s rendering is applied here
    (None for prompts already rendered, used as they are)."""

    prompts: PromptSet
    bench: Benchmark | None


def check_options(
    out: Path,
    overwrite: bool,
    metric: str,
    min_recovery: float,
    solutions: str | None = None,
    *,
    keep: Sequence[str] = (),
    min_retention: float | None = None,
    alphas: str | None = None,
) -> tuple[list[PromptSet], list[float]]:
    """Refuse a bad `--metric`, `--min-recovery`, `--solutions`, `--keep`, `--min-retention` or `--alphas`, and
    outputs that are not new: the manifest `out` and its PNG.

    Both follow the rule of every `-o` (`check_new_file`): an existing file is replaced only with `overwrite`.

    Returns:
        The keep sets, loaded, and the alphas to measure.
    """
    out = out.absolute()  # as messages name paths
    if metric not in METRICS:
        raise SurgeryError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    blends = parse_alphas(alphas)
    sets = keep_sets(keep)
    if min_retention is not None:
        if not sets:
            raise SurgeryError(
                "--min-retention needs a keep set to measure Retention on; add --keep W (e.g. general-text:48)"
            )
        if not 0 <= min_retention <= 100:
            raise SurgeryError(f"--min-retention {min_retention} is outside 0-100; give a percentage")
    if solutions is not None:
        check_solver(solutions)
        if metric != "nll":
            raise SurgeryError(
                f"--solutions {solutions} changes the solutions --metric nll scores; --metric {metric} grades the "
                "answers of each model itself: drop one"
            )
    if not 0 <= min_recovery <= 100:
        raise SurgeryError(f"--min-recovery {min_recovery} is outside 0-100; give a percentage")
    if out.suffix != ".json":
        raise SurgeryError(f"manifest path {out} should end in .json")
    check_new_file(out, overwrite)
    check_new_file(out.with_suffix(".png"), overwrite)
    return sets, blends


def check_auto_k(
    workload: str,
    validation: str,
    out: Path,
    *,
    source: str | Path,
    target: str | Path,
    ks: str | None,
    min_recovery: float,
    metric: str,
    overwrite: bool,
    options: ModelOptions | None = None,
    solutions: str | None = None,
    keep: str | None = None,
    min_retention: float | None = None,
) -> None:
    """What `analyze --auto-k` checks before it ranks, so that a refusal never leaves a manifest without a K.

    The checks `select` makes of its options, outputs and validation set, with `workload` as the ranking's
    and the pair's candidates as the modules `--ks` may count up to (`analyze` ranks every candidate).

    Raises:
        SurgeryError: as `select` does.
    """
    keeps = (keep,) if keep is not None else ()
    check_options(out, overwrite, metric, min_recovery, solutions, keep=keeps, min_retention=min_retention)
    trust = (options or ModelOptions()).trust_remote_code
    parse_ks(ks, len(find_candidates(open_checkpoint(source), open_checkpoint(target), trust).candidates))
    held_out = _validation(validation, metric, solutions)  # gold solutions, final answers where they are graded
    ranking = load_workload(workload)
    check_held_out([held_out.prompts], ranking.name, ranking.sha256, ranking.prompts)


def choose_k(
    manifest: str | Path,
    validation: str,
    out: str | Path,
    *,
    source: str | Path,
    target: str | Path,
    ks: str | None = None,
    min_recovery: float = 90.0,
    metric: str = "nll",
    batch_size: int = 8,
    max_new_tokens: int = 256,
    options: ModelOptions | None = None,
    overwrite: bool = False,
    solutions: str | None = None,
    keep: Sequence[str] = (),
    min_retention: float | None = None,
    alphas: str | None = None,
) -> SelectResult:
    """Measure the top K of `manifest` for each K on `validation`, choose K, and write the manifest with it.

    Notes (what is measured, a K taken without reaching `min_recovery`) go to stderr; the curve's table
    comes back in the result.

    Args:
        manifest: the ranking (from `analyze` or `manifest`).
        validation: a workload with gold solutions, disjoint from the ranking's (see `load_workload`); one of
            prompts already rendered (`surgery solutions`) is scored as it is, with `metric` `nll` only.
        out: where to write the manifest with its `selection` (a PNG of the curve goes beside it).
        source, target: the checkpoints it ranks (fingerprints must match).
        ks: comma-separated K values; default `k_grid.DEFAULT_KS` up to the manifest's module count (and that count).
        min_recovery: the Recovery, in percent, that the chosen K must reach.
        metric: `nll` or `accuracy`.
        batch_size: problems per forward pass (or `generate` call).
        max_new_tokens: the decoding budget for `accuracy`, and for the source's answers with `solutions`.
        options: how the models are loaded and prompted.
        overwrite: replace an existing `out` (which may be `manifest` itself) and the PNG beside it.
        solutions: `source` to score, instead of the gold solutions, the source's own answers to the validation
            problems that their gold answers grade correct (`source_solutions`: generated once, kept in surgery's
            cache); `nll` only.
        keep: keep sets, what the target must not lose (`general-text:N`, a JSONL of text, ...): every model's
            NLL on each is measured too, and each point of the curve gets its Retention (`metrics.retention`).
        min_retention: the Retention, in percent, every keep set must keep at the chosen K; on a keep set where
            the target has no advantage to keep (Retention undefined), the keep NLL must not rise above the
            target's beyond noise instead; needs `keep`.
        alphas: comma-separated blends in (0, 1] to measure each K at (`transplant --alpha`); the chosen alpha is
            written with K. None: 1 alone (a copy).

    Returns:
        The manifest written, with `selection`, and the curve's table.

    Raises:
        SurgeryError: bad options, an output that exists (without `overwrite`), a validation set without
            solutions or overlapping the ranking's prompts, a manifest for other checkpoints, a baseline gap
            within noise, or (with `solutions`) no answer of the source graded correct.
    """
    options = options or ModelOptions()
    out = Path(out)
    sets, blends = check_options(
        out, overwrite, metric, min_recovery, solutions, keep=keep, min_retention=min_retention, alphas=alphas
    )
    man = load_manifest(manifest)
    k_values = parse_ks(ks, len(man.modules))
    src, tgt = open_checkpoint(source), open_checkpoint(target)
    check_ranked_for(man, src, tgt, path=manifest, forceable=False)
    held_out = _validation(validation, metric, solutions)
    _check_disjoint(man, held_out, src, options)
    what = metric
    if solutions is not None:
        solved = source_solutions(
            src.path, validation, max_new_tokens=max_new_tokens, batch_size=batch_size, options=options
        )
        held_out = _Validation(load_workload(str(solved.out)), None)
        what = f"{metric} of the source's correct answers"
    count = len(held_out.prompts.prompts)
    measure_one = _nll_scores if metric == "nll" else _accuracy_scores
    keep_scores = nll_scorer({w.name: w for w in sets}, options.chat)

    def score(lm, tokenizer) -> dict[str, list[float]]:
        return {VALIDATION: measure_one(lm, tokenizer, held_out, options, batch_size, max_new_tokens)} | keep_scores(
            lm, tokenizer
        )

    states = [
        Patched(f"k{k}-a{a:g}", tuple(t for m in select_modules(man.modules, top_k=k) for t in m.tensors), a, k)
        for k in k_values
        for a in blends
    ]
    grid = ",".join(map(str, k_values)) + (f" at alpha {','.join(f'{a:g}' for a in blends)}" if blends != [1] else "")
    kept = f"; keep NLL on {', '.join(w.name for w in sets)}" if sets else ""
    print(f"select: {count} validation problems ({what}){kept}; source, target, then K = {grid}", file=sys.stderr)
    scores = measure_patched(src, tgt, states, score, options)
    s, t = scores["source"], scores["target"]
    _check_gap(s[VALIDATION], t[VALIDATION], metric, count)

    def point(state: Patched) -> CurvePoint:
        p = scores[state.label]
        value = _mean(p[VALIDATION])
        return CurvePoint(
            state.k or 0,
            value,
            recovery(value, _mean(t[VALIDATION]), _mean(s[VALIDATION])),
            paired_bootstrap(s[VALIDATION], t[VALIDATION], p[VALIDATION])["recovery"],
            state.alpha,
            tuple(keep_point(w.name, retention(s[w.name], t[w.name], p[w.name])) for w in sets),
        )

    curve = tuple(point(state) for state in states)
    chosen, rule, met = choose_point(curve, min_recovery, min_retention, metric)
    if not met:
        print(f"note: {rule}", file=sys.stderr)
    selection = Selection(
        k=chosen.k,
        rule=rule,
        metric=metric,
        validation={"name": held_out.prompts.name, "sha256": held_out.prompts.sha256, "count": count},
        baselines={"source": _mean(s[VALIDATION]), "target": _mean(t[VALIDATION])},
        curve=curve,
        alpha=chosen.alpha,
        keep=tuple({"name": w.name, "sha256": w.sha256, "count": len(w.prompts)} for w in sets),
        min_retention=min_retention,
    )
    result = replace(man, selection=selection)
    save_manifest(result, out)
    _plot(selection, out.with_suffix(".png"))
    return SelectResult(result, out, out.with_suffix(".png"), curve_table(selection))


def keep_point(name: str, r: Retention) -> KeepPoint:
    """A point's Retention on one keep set, as the manifest records it."""
    return KeepPoint(name, r.pct, r.ci95, r.nll_change, r.nll_change_ci95, r.undefined)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def curve_table(selection: Selection) -> str:
    """The curve as a markdown table, the chosen K (and alpha) marked; with keep sets, each one's Retention."""
    unit = "mean gold NLL" if selection.metric == "nll" else "accuracy"
    blended = any(p.alpha != 1 for p in selection.curve)
    keeps = [f"Retention on {k['name']} [95% CI]" for k in selection.keep]
    columns = ["K", *(["alpha"] if blended else []), unit, "Recovery [95% CI]", *keeps]

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cells + [""] * (len(columns) - len(cells))) + " |"

    lines = [row(columns), "|---" * len(columns) + "|"]
    for name in ("source", "target"):
        lines.append(row([name, *([""] if blended else []), f"{selection.baselines[name]:.4f}"]))
    for p in selection.curve:
        ci = f" [{p.recovery_ci95[0]:.1f}, {p.recovery_ci95[1]:.1f}]" if p.recovery_ci95 else ""
        mark = " (chosen)" if (p.k, p.alpha) == (selection.k, selection.alpha) else ""
        alpha = [f"{p.alpha:g}"] if blended else []
        lines.append(
            row([f"{p.k}{mark}", *alpha, f"{p.value:.4f}", f"{percent(p.recovery)}{ci}", *map(_kept, p.retention)])
        )
    return "\n".join(lines)


def _kept(r: KeepPoint) -> str:
    """A Retention cell: the percentage with its interval, or the keep NLL change where Retention is undefined."""
    if r.pct is None:
        lo, hi = r.nll_change_ci95
        return f"undefined (keep NLL {r.nll_change:+.3f} [{lo:+.3f}, {hi:+.3f}])"
    return f"{r.pct:.1f}%" + (f" [{r.ci95[0]:.1f}, {r.ci95[1]:.1f}]" if r.ci95 else "")


def _validation(spec: str, metric: str, solutions: str | None) -> _Validation:
    """The validation set: a rendered one as it is (`nll` only), else its problems, with final answers for
    `accuracy`. With `solutions`, the problems the source answers (`solution_problems`: a benchmark too)."""
    if solutions is not None:
        bench = solution_problems(spec, f"--solutions {solutions}", benchmarks=False)
        questions = tuple(p.question for p in bench.problems)
        return _Validation(PromptSet(bench.name, questions, tuple(p.solution for p in bench.problems)), bench)
    prompts = load_workload(spec)
    if prompts.prompt_format is not None and metric == "nll":
        require_solutions(prompts, "select")
        return _Validation(prompts, None)
    return _Validation(prompts, workload_benchmark(prompts, f"--metric {metric}", answers=metric == "accuracy"))


def _rendered(tokenizer, bench: Benchmark, chat: bool) -> list[tuple[str, list[int], str]]:
    """Each problem's prompt as `eval` renders it: (text, token ids, format)."""
    g = bench.grader
    return [render(tokenizer, prompt_messages(p, g, 0), prompt_text(p, g, 0), chat) for p in bench.problems]


def _as_eval_renders(tokenizer, validation: _Validation, chat: bool) -> PromptSet:
    """The validation workload with its prompts rendered as `eval` renders them (a rendered workload)."""
    if validation.bench is None:
        return validation.prompts
    rendered = _rendered(tokenizer, validation.bench, chat)
    texts = tuple(text for text, _, _ in rendered)
    return PromptSet(validation.prompts.name, texts, validation.prompts.solutions, rendered[0][2])


def _nll_scores(lm, tokenizer, validation: _Validation, options, batch_size, max_new_tokens) -> list[float]:
    """Per-problem NLL of the solutions, prompts rendered as `eval` renders them (or as they are, if rendered)."""
    return keep_nll(lm, tokenizer, _as_eval_renders(tokenizer, validation, options.chat), options.chat)


def _accuracy_scores(lm, tokenizer, validation: _Validation, options, batch_size, max_new_tokens) -> list[float]:
    """Per-problem correctness (1.0 or 0.0) of greedy answers, graded as `eval` grades them."""
    bench = validation.bench
    assert bench is not None  # `_validation` refuses rendered prompts for accuracy
    outputs: dict[int, str] = {}
    prompts = [ids for _, ids, _ in _rendered(tokenizer, bench, options.chat)]
    stops = () if options.chat and getattr(tokenizer, "chat_template", None) else STOP_STRINGS

    def keep(rows: list[int], texts: list[str], counts: list[int]) -> None:
        outputs.update(zip(rows, texts, strict=True))

    greedy_generate(lm, tokenizer, prompts, max_new_tokens, batch_size, stops, keep)
    return [1.0 if grade(bench.grader, outputs[i], p.answer)["correct"] else 0.0 for i, p in enumerate(bench.problems)]


def _check_disjoint(man: Manifest, validation: _Validation, source: Checkpoint, options: ModelOptions) -> None:
    """Refuse validation problems the manifest's ranking was computed on.

    The ranking workload is reloaded by name, or found in the solutions cache (`analyze --solutions source`).
    A ranking on rendered prompts is compared with the validation problems as `eval` renders them with the
    source's tokenizer, so that a ranking on the source's answers to some problems cannot choose K on the same
    problems' gold solutions.
    """
    if man.workload is None:
        return  # ranked from weights or a seed: no prompts to overlap
    ranking = _reload(man.workload)
    held_out = [validation.prompts]
    if ranking is not None and ranking.prompt_format is not None and validation.bench is not None:
        tokenizer = load_tokenizer(source.path, options.trust_remote_code)
        held_out.append(_as_eval_renders(tokenizer, validation, options.chat))
    check_held_out(held_out, man.workload.name, man.workload.sha256, ranking.prompts if ranking else None)


def _reload(workload: Workload) -> PromptSet | None:
    """A manifest's ranking workload loaded again: by its name, or from the solutions cache; None if neither."""
    try:
        return load_workload(workload.name)
    except SurgeryError:
        found = find_cached(workload.name, workload.sha256)
        return load_workload(str(found)) if found is not None else None


def check_held_out(validations: Sequence[PromptSet], ranking: str, sha256: str, prompts: Sequence[str] | None) -> None:
    """Refuse a validation set that is the ranking workload (`ranking`, its `sha256`) or shares a prompt with it.

    `validations` are the validation set in each form it is compared in (as given, and as `eval` renders it).
    `prompts` are the ranking workload's, None when it cannot be reloaded (a JSONL not found from here):
    then only an identical validation set can be refused, and a note says so.

    Raises:
        SurgeryError: the same workload, or shared prompts.
    """
    for validation in validations:
        if sha256 == validation.sha256:
            raise SurgeryError(
                f"the validation workload {validation.name} is the ranking's own ({ranking}); "
                "choose K on held-out problems, e.g. another seed: gsm8k-train:64:1"
            )
    if prompts is None:
        print(
            f"note: the ranking workload {ranking} cannot be reloaded here, so only an identical "
            "validation set could be refused",
            file=sys.stderr,
        )
        return
    for validation in validations:
        shared = set(prompts) & set(validation.prompts)
        if shared:
            raise SurgeryError(
                f"the validation workload {validation.name} shares {len(shared)} prompts with the ranking workload "
                f"{ranking}; choose K on held-out problems, e.g. another seed"
            )


def _check_gap(source: list[float], target: list[float], metric: str, n: int) -> None:
    """Refuse to choose K when the source-target gap itself is within noise (its 95% interval crosses 0)."""
    diffs = [a - b for a, b in zip(source, target, strict=True)]
    lo, hi = mean_interval(diffs)
    if lo <= 0 <= hi:
        hint = "use --metric accuracy (gold NLL can miss an accuracy gap) or more" if metric == "nll" else "use more"
        raise SurgeryError(
            f"the source-target {metric} gap on the {n} validation problems is within noise (95% CI of the "
            f"difference [{lo:.4g}, {hi:.4g}] crosses 0), so K cannot be chosen from it; {hint} validation problems"
        )


def _plot(selection: Selection, path: Path) -> None:
    """Recovery against K (a line per alpha, its 95% band), the chosen K marked; with keep sets, a second panel
    with the Retention on each (the keep NLL change where Retention is undefined is not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keeps = [str(k["name"]) for k in selection.keep]
    fig, axes = plt.subplots(1, 1 + bool(keeps), figsize=(6 + 6 * bool(keeps), 4), squeeze=False)
    rec_ax = axes[0][0]
    alphas = sorted({p.alpha for p in selection.curve}, reverse=True)
    for alpha in alphas:
        points = [p for p in selection.curve if p.alpha == alpha]
        ks = [p.k for p in points]
        name = f"Recovery ({selection.metric})" + (f", alpha {alpha:g}" if len(alphas) > 1 else "")
        rec = [p.recovery if p.recovery is not None else float("nan") for p in points]
        (line,) = rec_ax.plot(ks, rec, marker="o", label=name)
        lows = [p.recovery_ci95[0] if p.recovery_ci95 else float("nan") for p in points]
        highs = [p.recovery_ci95[1] if p.recovery_ci95 else float("nan") for p in points]
        rec_ax.fill_between(ks, lows, highs, alpha=0.2, color=line.get_color())
        if keeps:
            for i, keep in enumerate(keeps):
                kept = [p.retention[i].pct if p.retention[i].pct is not None else float("nan") for p in points]
                label = f"Retention on {keep}" + (f", alpha {alpha:g}" if len(alphas) > 1 else "")
                axes[0][1].plot(ks, kept, marker="s", ls="--" if i else "-", label=label)
    chosen = f"chosen K={selection.k}" + (f", alpha {selection.alpha:g}" if selection.alpha != 1 else "")
    rec_ax.set_ylabel("Recovery of the source-target gap (%)")
    rec_ax.set_title(f"select on {selection.validation['name']} ({selection.validation['count']} problems)")
    if keeps:
        axes[0][1].set_ylabel("Retention of the target's advantage (%)")
        axes[0][1].set_title("what the patch keeps of the target")
        if selection.min_retention is not None:
            axes[0][1].axhline(selection.min_retention, color="gray", lw=0.8, ls=":", label="--min-retention")
    all_ks = sorted({p.k for p in selection.curve})
    for ax in axes[0]:
        ax.axvline(selection.k, color="k", linestyle="--", label=chosen)
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ks, [str(k) for k in all_ks])
        ax.minorticks_off()
        ax.set_xlabel("K (top modules transplanted)")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
