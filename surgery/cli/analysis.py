"""`profile`, `manifest` and `analyze`: activation statistics, and rankings built from them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from surgery.analysis.ranking import METHODS, methods_taking_keep, methods_that_need
from surgery.checkpoints.options import ModelOptions
from surgery.cli.evaluation import SOLUTIONS, echo_selection
from surgery.cli.options import MAX_MEMORY, OVERWRITE, SELECT_OPTIONS, model_options, stack
from surgery.errors import SurgeryError
from surgery.manifest import Manifest

_profile_options = stack(
    click.option(
        "--workload",
        "-w",
        required=True,
        help="JSONL of prompts, or a built-in train split: gsm8k-train:N[:SEED], math-train:N[:SEED], addition-train:N",
    ),
    click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Greedy steps per prompt."),
    click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per forward pass."),
    MAX_MEMORY,
    model_options,
)
SEED = click.option("--seed", type=int, help=f"Seed for --method {', '.join(methods_that_need('seed'))}.")
KEEP = click.option(
    "--keep",
    help=f"{', '.join(methods_taking_keep())}: a workload the target must not lose (plain text works, e.g. "
    "general-text:48); each score becomes the module's task gain minus its loss on it.",
)


def _method(default: str, why: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--method", type=click.Choice(METHODS), default=default, show_default=True, help=f"Scoring method; {why}."
    )


def _summarize(manifest: Manifest, out: str, top: int = 5) -> None:
    click.echo(f"wrote {out}: {len(manifest.modules)} modules ranked by {manifest.method.name}")
    for m in manifest.modules[:top]:
        parts = f"  (task {m.task_gain:+.4g}, keep {m.keep_loss:+.4g})" if m.keep_loss is not None else ""
        click.echo(f"  {m.rank:4d}  {m.score:+.6g}  {m.name}{parts}")


@click.command("profile")
@click.argument("model")
@_profile_options
@click.option("--out", "-o", required=True, help="Stats file to write (.safetensors).")
@OVERWRITE
def profile_cmd(
    model: str,
    workload: str,
    max_new_tokens: int,
    batch_size: int,
    max_memory: str | None,
    options: ModelOptions,
    out: str,
    overwrite: bool,
) -> None:
    """Record activation statistics of every candidate module of MODEL on a workload."""
    # Imported here, not at the top: torch costs ~2 s and ~200 MiB that `transplant` does not need.
    from surgery.analysis.profiling import profile

    stats = profile(
        model,
        workload,
        out,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_memory=max_memory,
        options=options,
        overwrite=overwrite,
    )
    click.echo(
        f"wrote {out}: {len(stats.modules)} modules, {stats.meta.workload.prompts} prompts, "
        f"{int(stats.steps.sum())} decoding steps"
    )


@click.command("manifest")
@click.option("--source-stats", help="Stats of the source (from `surgery profile`).")
@click.option("--target-stats", help="Stats of the target (from `surgery profile`).")
@click.option("--source", "-s", help="Source checkpoint (default: the one the source stats name).")
@click.option("--target", "-t", help="Target checkpoint (default: the one the target stats name).")
@_method("lae", "the stats-based methods rank profiled models, taylor and swap-nll need --workload")
@SEED
@click.option(
    "--workload",
    "-w",
    help="taylor, swap-nll: a workload with gold solutions (gsm8k-train:N, math-train:N, JSONL prompt+solution).",
)
@KEEP
@click.option("--candidates-from", help="Score only the modules this manifest ranks (swap-nll costs one pass each).")
@click.option("--max-candidates", type=int, help="With --candidates-from: only its top N.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Problems per forward pass.")
@model_options
@click.option("--out", "-o", required=True, help="Manifest to write (.json).")
@OVERWRITE
def manifest_cmd(
    source_stats: str | None,
    target_stats: str | None,
    source: str | None,
    target: str | None,
    method: str,
    seed: int | None,
    workload: str | None,
    keep: str | None,
    candidates_from: str | None,
    max_candidates: int | None,
    batch_size: int,
    options: ModelOptions,
    out: str,
    overwrite: bool,
) -> None:
    """Rank the candidate modules of a source/target pair into a manifest."""
    from surgery.analysis.rank import rank

    manifest = rank(
        out,
        source_stats=source_stats,
        target_stats=target_stats,
        source=source,
        target=target,
        method=method,
        seed=seed,
        workload=workload,
        keep=keep,
        candidates_from=candidates_from,
        max_candidates=max_candidates,
        batch_size=batch_size,
        options=options,
        overwrite=overwrite,
    )
    _summarize(manifest, out)


@click.command("analyze")
@click.option("--source", "-s", required=True, help="Checkpoint that is good at the task.")
@click.option("--target", "-t", required=True, help="Checkpoint to patch.")
@_profile_options
@_method("taylor", "taylor measured best on both studied pairs (README); lae is the paper's")
@SEED
@KEEP
@SOLUTIONS
@click.option("--auto-k", is_flag=True, help="Then choose K on --validation, as `surgery select` does.")
@click.option("--validation", help="With --auto-k: held-out problems with gold solutions, e.g. gsm8k-train:64:1.")
@SELECT_OPTIONS
@click.option("--out", "-o", required=True, help="Manifest to write (.json); stats are cached beside it.")
@OVERWRITE
def analyze_cmd(
    source: str,
    target: str,
    workload: str,
    max_new_tokens: int,
    batch_size: int,
    max_memory: str | None,
    options: ModelOptions,
    method: str,
    seed: int | None,
    keep: str | None,
    solutions: str | None,
    auto_k: bool,
    validation: str | None,
    ks: str | None,
    min_recovery: float,
    metric: str,
    min_retention: float | None,
    out: str,
    overwrite: bool,
) -> None:
    """Profile SOURCE, then TARGET (never both in memory), and write a ranked manifest."""
    if auto_k != (validation is not None):
        raise SurgeryError("--auto-k and --validation W go together: K is chosen on the validation problems")
    ctx = click.get_current_context()
    choice = ("ks", "min_recovery", "metric", "min_retention")
    given = [name for name in choice if ctx.get_parameter_source(name) != ParameterSource.DEFAULT]
    if given and validation is None:
        raise SurgeryError(f"--{given[0].replace('_', '-')} applies with --auto-k --validation W, which chooses K")
    if validation is None:
        from surgery.evaluation.analyze_select import analyze_on

        manifest = analyze_on(
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
        _summarize(manifest, out)
        return
    from surgery.evaluation.analyze_select import analyze_and_select

    result = analyze_and_select(
        workload,
        validation,
        out,
        source=source,
        target=target,
        method=method,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_memory=max_memory,
        ks=ks,
        min_recovery=min_recovery,
        metric=metric,
        options=options,
        overwrite=overwrite,
        solutions=solutions,
        keep=keep,
        min_retention=min_retention,
    )
    _summarize(result.manifest, out)
    echo_selection(result)
