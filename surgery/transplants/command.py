"""What `surgery transplant` makes: a checkpoint, a patch (`patch`), or only the write plan (`dry_run`).

The flag combinations the command refuses are refused here, so that the Python API refuses them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.transplants.patch import PatchResult, plan_patch, write_patch
from surgery.transplants.plan import WritePlan
from surgery.transplants.selection import select_transplant
from surgery.transplants.write import TransplantResult, output_summaries, plan_transplant, transplant


def transplant_output(
    *,
    target: str | Path,
    source: str | Path,
    out: str | Path,
    manifest: str | Path | None = None,
    top_k: int | None = None,
    only: str | None = None,
    layers: tuple[int, int] | None = None,
    modules: Sequence[str] = (),
    force: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    eval_results: Sequence[str | Path] = (),
    link: bool = False,
    patch: bool = False,
    reversible: bool = False,
    dry_run: bool = False,
    alpha: float | None = None,
) -> TransplantResult | PatchResult | WritePlan:
    """Write what `surgery transplant` writes: `transplant`'s checkpoint, or with `patch` `write_patch`'s patch.

    Args:
        target, source, out, manifest, top_k, only, layers, modules, force, overwrite, progress,
            trust_remote_code, eval_results, link, alpha: as in `transplant`.
        patch: write a patch (`write_patch`) instead of a checkpoint.
        reversible: with `patch`, keep the target's originals too.
        dry_run: check the inputs and return the write plan, writing nothing.

    Returns:
        What was written, or with `dry_run` the plan (`WritePlan.describe` says it).

    Raises:
        SurgeryError: flags that do not go together, or any invalid input; nothing is written then.
    """
    if reversible and not patch:
        raise SurgeryError("--reversible only applies with --patch")
    if patch and (link or eval_results):
        raise SurgeryError("--link and --eval-results apply to full checkpoints, not to --patch")
    inputs = {"target": target, "source": source, "out": Path(out), "overwrite": overwrite}
    choice = {
        "manifest": manifest,
        "top_k": top_k,
        "only": only,
        "layers": layers,
        "modules": modules,
        "force": force,
        "trust_remote_code": trust_remote_code,
        "alpha": alpha,
    }
    if dry_run:
        sel = select_transplant(**inputs, **choice)
        output_summaries(sel, eval_results, force)  # refused as the write would refuse them
        return plan_patch(sel, reversible=reversible) if patch else plan_transplant(sel, link=link)
    if patch:
        return write_patch(**inputs, **choice, progress=progress, reversible=reversible)
    return transplant(**inputs, **choice, progress=progress, eval_results=eval_results, link=link)
