"""`eval`, `report` and `sweep`: score models on math benchmarks, compare them, sweep K."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from surgery.checkpoints.options import ModelOptions
from surgery.cli.options import (
    ALPHAS,
    KEEP_SETS,
    MAX_MEMORY,
    OVERWRITE,
    SELECT_OPTIONS,
    ks_option,
    model_options,
    stack,
)
from surgery.errors import SurgeryError
from surgery.evaluation.benchmarks import BENCHMARKS
from surgery.evaluation.k_grid import SWEEP_SMALLEST_K
from surgery.fileio import check_new_file

if TYPE_CHECKING:
    from surgery.evaluation.select import SelectResult

# How a problem is asked: `eval` and `solutions` (whose prompts must be eval's) take both.
SHOTS = click.option("--shots", type=int, default=0, show_default=True, help="Chain-of-thought exemplars (0-8).")
PROMPT = click.option(
    "--prompt",
    type=click.Choice(["surgery", "lm-eval"]),
    default="surgery",
    show_default=True,
    help="surgery: answer-format instruction, chat template; lm-eval: lm-eval-harness's gsm8k prompt (comparable).",
)

_eval_options = stack(
    click.option("--benchmark", "-b", required=True, help=f"{', '.join(BENCHMARKS)}, or a JSONL with question/answer."),
    click.option("--limit", type=int, help="Score a seeded random subset of N problems (the paper: 50)."),
    click.option("--seed", type=int, default=42, show_default=True, help="Seed of the --limit subset."),
    SHOTS,
    click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts per generate call."),
    model_options,
)


@click.command("eval")
@click.argument("model")
@_eval_options
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Greedy decoding budget.")
@MAX_MEMORY
@click.option("--out", "-o", required=True, help="Results folder; a rerun with the same settings resumes.")
@click.option("--patch", help="A patch folder (`transplant --patch`) to apply in memory first; nothing is written.")
@PROMPT
@click.option(
    "--keep",
    multiple=True,
    help="A keep set (general-text:N, stdlib-docs:N, a JSONL) to measure MODEL's NLL on, per row, into "
    "FOLDER/keep/ for `report --keep`; repeatable. Added to a complete eval, only this is computed.",
)
def eval_cmd(
    model: str,
    benchmark: str,
    out: str,
    options: ModelOptions,
    limit: int | None,
    seed: int,
    shots: int,
    batch_size: int,
    max_new_tokens: int,
    max_memory: str | None,
    patch: str | None,
    prompt: str,
    keep: tuple[str, ...],
) -> None:
    """Score MODEL on a math benchmark with greedy decoding."""
    from surgery.evaluation.keep import read_keep
    from surgery.evaluation.runner import evaluate

    s = evaluate(
        model,
        benchmark,
        out,
        limit=limit,
        seed=seed,
        shots=shots,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_memory=max_memory,
        patch=patch,
        prompt=prompt,
        keep=keep,
        options=options,
    )
    lo, hi = s.accuracy_ci95
    nll = f"{s.nll_mean:.3f}" if s.nll_mean is not None else "n/a"
    click.echo(
        f"{s.benchmark}: {s.correct}/{s.problems} = {100 * s.accuracy:.1f}% "
        f"[95% CI {100 * lo:.1f}, {100 * hi:.1f}], gold NLL {nll}; results in {out}"
    )
    for spec in keep:
        k = read_keep(Path(out), spec)
        click.echo(f"keep NLL on {k.workload}: {k.mean:.4f} nats/token over {k.rows} rows, in {out}/keep")


@click.command("report")
@click.option("--source", "-s", required=True, help="Results folder of the source model.")
@click.option("--target", "-t", required=True, help="Results folder of the target model.")
@click.option("--patched", "-p", required=True, multiple=True, help="Results folder of a patched model; repeatable.")
@click.option(
    "--keep",
    help="A keep set each folder measured with `eval --keep`: add each patched model's Retention on it "
    "(or its keep NLL change, where the target has no advantage there).",
)
@click.option("--out", "-o", help="Also write the report as JSON here; must not exist unless --overwrite.")
@OVERWRITE
def report_cmd(
    source: str, target: str, patched: tuple[str, ...], keep: str | None, out: str | None, overwrite: bool
) -> None:
    """TIR and Recovery of patched models, with paired bootstrap 95% intervals (and with --keep, Retention)."""
    from surgery.evaluation.report import markdown, report, save_report

    if out:
        check_new_file(Path(out), overwrite)
    result = report(source, target, list(patched), keep=keep)
    click.echo(markdown(result))
    if out:
        save_report(result, out)


def echo_selection(result: SelectResult) -> None:
    """Print what `select` chose: the curve's table, then where it went."""
    click.echo(result.table)
    sel = result.selection
    blend = f", alpha {sel.alpha:g}" if sel.alpha != 1 else ""
    click.echo(f"wrote {result.out}: K={sel.k}{blend} ({sel.rule}); curve in {result.plot}")


@click.command("sweep")
@click.option("--target", "-t", required=True, help="Checkpoint to patch (loaded once).")
@click.option("--source", "-s", required=True, help="Checkpoint modules come from (memory-mapped).")
@click.option("--manifest", "-m", required=True, help="Ranking to take the top K from.")
@ks_option(SWEEP_SMALLEST_K)
@click.option("--max-new-tokens", default="256", show_default=True, help="Comma-separated budgets (eval's default).")
@_eval_options
@click.option("--random-seed", type=int, default=0, show_default=True, help="Seed of the random-K baseline.")
@click.option(
    "--random/--no-random",
    default=True,
    show_default=True,
    help="Also evaluate the random-K baseline at every K (one more evaluation per K and budget).",
)
@click.option("--force", is_flag=True, help="Use a manifest made for other checkpoints.")
@ALPHAS
@KEEP_SETS
@click.option("--out", "-o", required=True, help="Folder for the evaluations, sweep.md/json and sweep.png.")
def sweep_cmd(
    target: str,
    source: str,
    manifest: str,
    ks: str | None,
    max_new_tokens: str,
    benchmark: str,
    limit: int | None,
    seed: int,
    shots: int,
    batch_size: int,
    options: ModelOptions,
    random_seed: int,
    random: bool,
    force: bool,
    alphas: str | None,
    keep: tuple[str, ...],
    out: str,
) -> None:
    """Accuracy, TIR and Recovery against K (and alpha), swapping modules in memory (no checkpoint per K); with
    --keep, each patched model's Retention too."""
    from surgery.evaluation.sweep import markdown, sweep

    table = sweep(
        manifest,
        benchmark,
        out,
        source=source,
        target=target,
        ks=ks,
        max_new_tokens=max_new_tokens,
        limit=limit,
        seed=seed,
        shots=shots,
        batch_size=batch_size,
        random_seed=random_seed,
        random=random,
        force=force,
        alphas=alphas,
        keep=keep,
        options=options,
    )
    click.echo(markdown(table))
    click.echo(f"table and plot in {out}")


# `analyze` and `select` take it; `solutions.SOLVERS` are its values (checked there, so --help stays torch-free).
SOLUTIONS = click.option(
    "--solutions",
    metavar="source",
    help="source: score the source's own answers that the gold answers grade correct instead of the gold solutions "
    "(analyze: taylor's and swap-nll's workload; select and --auto-k: the --validation of --metric nll). Generated "
    "once (--max-new-tokens) into surgery's cache, SURGERY_CACHE or ~/.cache/surgery/solutions/, and reused.",
)


@click.command("select")
@click.argument("manifest", required=False)
@click.option("--manifest", "-m", "manifest_option", help="The ranking to choose K for (or pass it as MANIFEST).")
@click.option("--source", "-s", required=True, help="The source the manifest ranks.")
@click.option("--target", "-t", required=True, help="The target the manifest ranks.")
@click.option(
    "--validation", required=True, help="Held-out problems with gold solutions, e.g. gsm8k-train:64:1 (another seed)."
)
@SELECT_OPTIONS
@SOLUTIONS
@KEEP_SETS
@ALPHAS
@click.option("--batch-size", type=int, default=8, show_default=True, help="Problems per forward pass.")
@click.option(
    "--max-new-tokens",
    type=int,
    default=256,
    show_default=True,
    help="Decoding budget for --metric accuracy and --solutions source.",
)
@model_options
@click.option(
    "--out",
    "-o",
    required=True,
    help="Manifest to write (.json), a PNG beside it: each must not exist unless --overwrite.",
)
@OVERWRITE
def select_cmd(
    manifest: str | None,
    manifest_option: str | None,
    source: str,
    target: str,
    validation: str,
    ks: str | None,
    min_recovery: float,
    metric: str,
    solutions: str | None,
    keep: tuple[str, ...],
    min_retention: float | None,
    alphas: str | None,
    batch_size: int,
    max_new_tokens: int,
    options: ModelOptions,
    out: str,
    overwrite: bool,
) -> None:
    """Choose K for the manifest (-m M, or MANIFEST) on held-out problems: swap the top K in memory for each K and
    measure Recovery (with --keep, Retention too; with --alphas, each K blended)."""
    from surgery.evaluation.select import choose_k

    if manifest is not None and manifest_option is not None:
        raise SurgeryError("name the manifest either as MANIFEST or with -m, not both")
    manifest = manifest or manifest_option
    if manifest is None:
        raise SurgeryError("select needs a manifest: surgery select -m MANIFEST -s SOURCE -t TARGET ...")
    result = choose_k(
        manifest,
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
        overwrite=overwrite,
        solutions=solutions,
        keep=keep,
        min_retention=min_retention,
        alphas=alphas,
    )
    echo_selection(result)


@click.command("solutions")
@click.argument("model")
@click.option(
    "--workload",
    "-w",
    required=True,
    help=f"The problems: {', '.join(BENCHMARKS)}, gsm8k-train:N[:SEED], math-train:N, addition-train:N, or a JSONL "
    "with question and answer (or prompt and a solution ending in '#### N' or \\boxed{}).",
)
@click.option("--limit", type=int, help="Answer a seeded random subset of N problems.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the --limit subset.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Greedy decoding budget.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts per generate call.")
@SHOTS
@PROMPT
@model_options
@MAX_MEMORY
@click.option(
    "--out",
    "-o",
    required=True,
    help="Workload to write (JSONL), one line per correct answer; the answers are kept, resumably, in OUT.eval/.",
)
@OVERWRITE
def solutions_cmd(
    model: str,
    workload: str,
    limit: int | None,
    seed: int,
    max_new_tokens: int,
    batch_size: int,
    shots: int,
    prompt: str,
    options: ModelOptions,
    max_memory: str | None,
    out: str,
    overwrite: bool,
) -> None:
    """Answer the problems with MODEL as eval does and keep its correct answers: a workload of eval's exact prompts
    and MODEL's own solutions, for taylor, swap-nll and select --metric nll."""
    from surgery.evaluation.solutions import solutions

    result = solutions(
        model,
        workload,
        out,
        limit=limit,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        shots=shots,
        prompt=prompt,
        max_memory=max_memory,
        options=options,
        overwrite=overwrite,
    )
    s = result.summary
    click.echo(
        f"wrote {out}: {s.correct} of {s.problems} answers graded correct ({100 * s.accuracy:.1f}%), "
        f"{result.prompt_format} prompts as eval renders them; answers in {result.records}"
    )
