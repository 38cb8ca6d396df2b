"""`profile`, `manifest` and `analyze`: activation statistics, and rankings built from them."""

from __future__ import annotations

from typing import Any

import click

from surgery.analysis.ranking import METHODS
from surgery.checkpoints.options import ModelOptions
from surgery.cli.options import MAX_MEMORY, TRUST_REMOTE_CODE, model_options, stack
from surgery.manifest import Manifest

_profile_options = stack(
    click.option(
        "--workload",
        "-w",
        required=True,
        help="JSONL of prompts, or a built-in train split: gsm8k-train:COUNT[:SEED], math-train:COUNT[:SEED].",
    ),
    click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Greedy steps per prompt."),
    click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per forward pass."),
    MAX_MEMORY,
    model_options,
)
_method_options = stack(
    click.option("--method", type=click.Choice(METHODS), default="lae", show_default=True, help="Scoring method."),
    click.option("--seed", type=int, help="Seed for --method random."),
)


def _summarize(manifest: Manifest, out: str, top: int = 5) -> None:
    click.echo(f"wrote {out}: {len(manifest.modules)} modules ranked by {manifest.method.name}")
    for m in manifest.modules[:top]:
        click.echo(f"  {m.rank:4d}  {m.score:+.6g}  {m.name}")


@click.command("profile")
@click.argument("model")
@_profile_options
@click.option("--out", "-o", required=True, help="Stats file to write (.safetensors).")
def profile_cmd(model: str, workload: str, out: str, options: ModelOptions, **settings: Any) -> None:
    """Record activation statistics of every candidate module of MODEL on a workload."""
    # Imported here, not at the top: torch costs ~2 s and ~200 MiB that `transplant` does not need.
    from surgery.analysis.profiling import profile

    stats = profile(model, workload, out, **settings, **options.kwargs())
    click.echo(
        f"wrote {out}: {len(stats.modules)} modules, {stats.meta.workload.prompts} prompts, "
        f"{int(stats.steps.sum())} decoding steps"
    )


@click.command("manifest")
@click.option("--source-stats", help="Stats of the source (from `surgery profile`).")
@click.option("--target-stats", help="Stats of the target (from `surgery profile`).")
@click.option("--source", "-s", help="Source checkpoint (default: the one the source stats name).")
@click.option("--target", "-t", help="Target checkpoint (default: the one the target stats name).")
@_method_options
@click.option("--out", "-o", required=True, help="Manifest to write (.json).")
@TRUST_REMOTE_CODE
def manifest_cmd(out: str, **request: Any) -> None:
    """Rank the candidate modules of a source/target pair into a manifest."""
    from surgery.analysis.rank import rank

    manifest = rank(out=out, **request)
    _summarize(manifest, out)


@click.command("analyze")
@click.option("--source", "-s", required=True, help="Checkpoint that is good at the task.")
@click.option("--target", "-t", required=True, help="Checkpoint to patch.")
@_profile_options
@_method_options
@click.option("--out", "-o", required=True, help="Manifest to write (.json); stats are cached beside it.")
def analyze_cmd(source: str, target: str, workload: str, out: str, options: ModelOptions, **settings: Any) -> None:
    """Profile SOURCE, then TARGET (never both in memory), and write a ranked manifest."""
    from surgery.analysis.analyze import analyze

    manifest = analyze(source, target, workload, out, **settings, **options.kwargs())
    _summarize(manifest, out)
