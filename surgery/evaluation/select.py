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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from surgery.analysis.nll import encode_gold, gold_nll
from surgery.analysis.workloads import PromptSet, load_workload, require_solutions
from surgery.checkpoints.candidates import find_candidates
from surgery.checkpoints.folder import Checkpoint, open_checkpoint
from surgery.checkpoints.loading import load_tokenizer, with_model
from surgery.checkpoints.options import ModelOptions
from surgery.checkpoints.swap import swapped
from surgery.errors import SurgeryError
from surgery.evaluation.benchmarks import STOP_STRINGS, Benchmark, grade, prompt_messages, prompt_text
from surgery.evaluation.generate import greedy_generate, render
from surgery.evaluation.k_grid import parse_ks
from surgery.evaluation.metrics import mean_interval, paired_bootstrap, recovery
from surgery.evaluation.solutions import (
    check_solver,
    find_cached,
    solution_problems,
    source_solutions,
    workload_benchmark,
)
from surgery.fileio import check_new_file
from surgery.manifest import (
    CurvePoint,
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


def check_options(out: Path, overwrite: bool, metric: str, min_recovery: float, solutions: str | None = None) -> None:
    """Refuse a bad `--metric`, `--min-recovery` or `--solutions`, and outputs that are not new: the manifest
    `out` and its PNG.

    Both follow the rule of every `-o` (`check_new_file`): an existing file is replaced only with `overwrite`.
    """
    out = out.absolute()  # as messages name paths
    if metric not in METRICS:
        raise SurgeryError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
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
) -> None:
    """What `analyze --auto-k` checks before it ranks, so that a refusal never leaves a manifest without a K.

    The checks `select` makes of its options, outputs and validation set, with `workload` as the ranking's
    and the pair's candidates as the modules `--ks` may count up to (`analyze` ranks every candidate).

    Raises:
        SurgeryError: as `select` does.
    """
    check_options(out, overwrite, metric, min_recovery, solutions)
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

    Returns:
        The manifest written, with `selection`, and the curve's table.

    Raises:
        SurgeryError: bad options, an output that exists (without `overwrite`), a validation set without
            solutions or overlapping the ranking's prompts, a manifest for other checkpoints, a baseline gap
            within noise, or (with `solutions`) no answer of the source graded correct.
    """
    options = options or ModelOptions()
    out = Path(out)
    check_options(out, overwrite, metric, min_recovery, solutions)
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

    measure = _nll_scores if metric == "nll" else _accuracy_scores

    def on_source(lm, tokenizer) -> dict[str, list[float]]:
        return {"source": measure(lm, tokenizer, held_out, options, batch_size, max_new_tokens)}

    def on_target(lm, tokenizer) -> dict[str, list[float]]:
        result = {"target": measure(lm, tokenizer, held_out, options, batch_size, max_new_tokens)}
        for k in k_values:
            tensors = [t for m in select_modules(man.modules, top_k=k) for t in m.tensors]
            with swapped(lm, src, tensors):
                result[f"k{k}"] = measure(lm, tokenizer, held_out, options, batch_size, max_new_tokens)
        return result

    ks_text = ",".join(map(str, k_values))
    print(f"select: {count} validation problems ({what}); source, target, then K = {ks_text}", file=sys.stderr)
    per_problem = {**_with_model(src, options, on_source), **_with_model(tgt, options, on_target)}
    s, t = per_problem["source"], per_problem["target"]
    _check_gap(s, t, metric, count)
    mean = {key: sum(v) / len(v) for key, v in per_problem.items()}
    curve = tuple(
        CurvePoint(
            k,
            mean[f"k{k}"],
            recovery(mean[f"k{k}"], mean["target"], mean["source"]),
            paired_bootstrap(s, t, per_problem[f"k{k}"])["recovery"],
        )
        for k in k_values
    )
    reached = [p for p in curve if p.recovery is not None and p.recovery >= min_recovery]
    if reached:
        chosen = reached[0]
        rule = f"smallest K with Recovery >= {min_recovery:g}% of the {metric} gap on the validation problems"
    else:
        chosen = max(curve, key=lambda p: p.recovery if p.recovery is not None else float("-inf"))
        rule = (
            f"no K reached {min_recovery:g}% Recovery of the {metric} gap; the best K "
            f"({_pct(chosen.recovery)} at K={chosen.k}) was taken"
        )
        print(f"note: {rule}", file=sys.stderr)
    selection = Selection(
        k=chosen.k,
        rule=rule,
        metric=metric,
        validation={"name": held_out.prompts.name, "sha256": held_out.prompts.sha256, "count": count},
        baselines={"source": mean["source"], "target": mean["target"]},
        curve=curve,
    )
    result = replace(man, selection=selection)
    save_manifest(result, out)
    _plot(selection, out.with_suffix(".png"))
    return SelectResult(result, out, out.with_suffix(".png"), curve_table(selection))


def curve_table(selection: Selection) -> str:
    """The curve as a markdown table, the chosen K marked."""
    unit = "mean gold NLL" if selection.metric == "nll" else "accuracy"
    lines = [
        f"| K | {unit} | Recovery [95% CI] |",
        "|---|---|---|",
        f"| source | {selection.baselines['source']:.4f} | |",
        f"| target | {selection.baselines['target']:.4f} | |",
    ]
    for p in selection.curve:
        ci = f" [{p.recovery_ci95[0]:.1f}, {p.recovery_ci95[1]:.1f}]" if p.recovery_ci95 else ""
        mark = " (chosen)" if p.k == selection.k else ""
        lines.append(f"| {p.k}{mark} | {p.value:.4f} | {_pct(p.recovery)}{ci} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return f"{value:.1f}%" if value is not None else "undefined"


def _with_model(ckpt: Checkpoint, options: ModelOptions, work: Callable[..., dict[str, list[float]]]):
    """Run `work(model, tokenizer)` on `ckpt`, then free the model: one model in memory at a time."""
    ckpt.check_config()
    tokenizer = load_tokenizer(ckpt.path, options.trust_remote_code)
    return with_model(ckpt.path, options, lambda lm: work(lm, tokenizer))


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
    gold = encode_gold(tokenizer, _as_eval_renders(tokenizer, validation, options.chat), options.chat)
    return gold_nll(lm, gold.prompts, gold.solutions, gold.pad_id)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [p.k for p in selection.curve]
    rec = [p.recovery if p.recovery is not None else float("nan") for p in selection.curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, rec, marker="o", label=f"Recovery ({selection.metric})")
    lows = [p.recovery_ci95[0] if p.recovery_ci95 else float("nan") for p in selection.curve]
    highs = [p.recovery_ci95[1] if p.recovery_ci95 else float("nan") for p in selection.curve]
    ax.fill_between(ks, lows, highs, alpha=0.2, label="95% CI")
    ax.axvline(selection.k, color="k", linestyle="--", label=f"chosen K={selection.k}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (top modules transplanted)")
    ax.set_ylabel("Recovery of the source-target gap (%)")
    ax.set_title(f"select on {selection.validation['name']} ({selection.validation['count']} problems)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
