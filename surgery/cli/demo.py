"""`demo`: the whole pipeline on SmolLM2-135M-Instruct, offline."""

from __future__ import annotations

import click

from surgery.demo.run import PAIRS


@click.command("demo")
@click.option(
    "--pair",
    type=click.Choice(list(PAIRS)),
    default=next(iter(PAIRS)),
    show_default=True,
    help="; ".join(f"{name}: {pair.summary}" for name, pair in PAIRS.items()) + ".",
)
@click.option("--work", help="Folder for every artefact; reruns reuse it [default: the pair's, .demo or .demo-large].")
@click.option("--limit", type=int, help="Test problems to evaluate [default: the pair's].")
@click.option("--top-k", "-k", type=int, help="Modules to transplant [default: the pair's].")
def demo_cmd(pair: str, work: str | None, limit: int | None, top_k: int | None) -> None:
    """Run the whole pipeline on a real model from PyPI, offline: import, pair, analyze, transplant, eval."""
    from dataclasses import replace

    from surgery.demo.run import run_demo

    settings = PAIRS[pair].settings
    settings = replace(
        settings,
        limit=settings.limit if limit is None else limit,
        top_k=settings.top_k if top_k is None else top_k,
    )
    run_demo(work or PAIRS[pair].work, settings, log=click.echo)
