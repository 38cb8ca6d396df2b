"""Flags shared by several commands, each declared once here.

`model_options` turns `--dtype`, `--no-chat`, `--trust-remote-code` and `--quiet` into one
`ModelOptions` argument, as mergekit's `add_merge_options` does for its `MergeOptions`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from surgery.checkpoints.options import DEVICES, DTYPES, ModelOptions
from surgery.evaluation.k_grid import default_grid

OUT_FOLDER = click.option("--out", "-o", required=True, help="Output folder; must not exist unless --overwrite.")
OVERWRITE = click.option(
    "--overwrite", is_flag=True, help="Replace an existing OUT, only after the new one is complete."
)
TRUST_REMOTE_CODE = click.option("--trust-remote-code", is_flag=True, help="Allow custom model code (off by default).")
QUIET = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
AS_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
MAX_MEMORY = click.option(
    "--max-memory", help="RAM budget, e.g. 2GiB: weights beyond it are read from disk (accelerate)."
)
NO_CHAT = click.option("--no-chat", is_flag=True, help="Do not apply the tokenizer's chat template.")
DTYPE = click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="auto",
    show_default=True,
    help="Compute dtype; auto keeps the checkpoint's; fast: bfloat16 where the CPU/GPU runs it natively, else float32.",
)


def stack(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Apply click options in the order listed (the order `--help` shows them)."""

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


DEVICE = click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="auto: the first CUDA GPU when torch sees one, else the CPU.",
)


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add --no-chat, --dtype, --device, --trust-remote-code and -q; the command receives `options: ModelOptions`."""

    @functools.wraps(f)
    def wrapper(
        *args: Any, no_chat: bool, dtype: str, device: str, trust_remote_code: bool, quiet: bool, **kwargs: Any
    ) -> Any:
        options = ModelOptions(
            dtype=dtype,  # type: ignore[arg-type]  (click.Choice keeps it to DTYPES)
            chat=not no_chat,
            trust_remote_code=trust_remote_code,
            progress=not quiet,
            device=device,  # type: ignore[arg-type]  (click.Choice keeps it to DEVICES)
        )
        return f(*args, options=options, **kwargs)

    return stack(NO_CHAT, DTYPE, DEVICE, TRUST_REMOTE_CODE, QUIET)(wrapper)


def ks_option(smallest: int = 1) -> Callable[[Any], Any]:
    """`--ks` (also `-k`, `--k`): the K values of `sweep`, `select` and `analyze --auto-k`, one spelling for all;
    the default grid (`k_grid.DEFAULT_KS`) from `smallest` on."""
    grid = ",".join(map(str, default_grid(smallest)))
    return click.option(
        "--ks", "-k", "--k", "ks", help=f"Comma-separated K values [default: {grid}, up to the manifest's modules]."
    )


# What a patch costs the target, and blends instead of copies: `sweep` and `select` take both.
KEEP_SETS = click.option(
    "--keep",
    multiple=True,
    help="A keep set, what the target must not lose (general-text:N, stdlib-docs:N, a JSONL of text): each "
    "model's NLL on it is measured and each patched one gets its Retention; repeatable.",
)
ALPHAS = click.option(
    "--alphas",
    help="Comma-separated blends in (0, 1], e.g. 0.25,0.5,1: each K at each alpha (as transplant --alpha writes) "
    "[default: 1, a copy].",
)

# How `select` chooses K; `analyze --auto-k` takes the same flags.
SELECT_OPTIONS = stack(
    ks_option(),
    click.option(
        "--min-recovery", type=float, default=90.0, show_default=True, help="Choose the smallest K reaching this %."
    ),
    click.option(
        "--metric",
        type=click.Choice(["nll", "accuracy"]),
        default="nll",
        show_default=True,
        help="Gold-solution NLL (one pass per K) or accuracy (generate and grade, as eval does).",
    ),
    click.option(
        "--min-retention",
        type=float,
        help="With --keep: choose the smallest K whose Recovery reaches --min-recovery while every keep set keeps "
        "at least this % of the target's advantage over the source (where the target has none, while its keep NLL "
        "does not rise beyond noise).",
    ),
)


def size(nbytes: int) -> str:
    """A byte count for people: `512 B`, `24.0 KiB`, `3.4 MiB`, `2.10 GiB`."""
    if nbytes < 1024:
        return f"{nbytes} B"
    for unit, scale in (("KiB", 2**10), ("MiB", 2**20)):
        if nbytes < 1024 * scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 2**30:.2f} GiB"
