"""`demo`: the whole pipeline on SmolLM2-135M-Instruct, offline."""

from __future__ import annotations

import click


@click.command("demo")
@click.option(
    "--pair",
    type=click.Choice(["smollm2-addition", "smollm2-math", "qwen-rollback"]),
    default="smollm2-addition",
    show_default=True,
    help="SmolLM2-135M on 2-digit addition (fast), on GSM8K (accuracy at the floor), or Qwen2.5-Coder-1.5B.",
)
@click.option("--work", help="Folder for every artefact; reruns reuse it [default: .demo, or .demo-large].")
@click.option("--limit", type=int, help="Test problems to evaluate [default: the pair's].")
@click.option("--top-k", "-k", type=int, help="Modules to transplant [default: the pair's].")
def demo_cmd(pair: str, work: str | None, limit: int | None, top_k: int | None) -> None:
    """Run the whole pipeline on a real model from PyPI, offline: import, pair, analyze, transplant, eval."""
    from dataclasses import replace

    from surgery.demo.run import PRESETS, run_demo

    settings = PRESETS[pair]
    settings = replace(
        settings,
        limit=settings.limit if limit is None else limit,
        top_k=settings.top_k if top_k is None else top_k,
    )
    run_demo(work or (".demo-large" if pair == "qwen-rollback" else ".demo"), settings, log=click.echo)
