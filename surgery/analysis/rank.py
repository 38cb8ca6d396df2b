"""Rank without profiling and write the manifest (`surgery manifest`): from existing stats files, from
the weights alone, or from the task loss on a gold workload."""

from __future__ import annotations

from pathlib import Path

from surgery.analysis.ranking import RANKING_METHODS, build_manifest
from surgery.analysis.stats import load_stats
from surgery.analysis.workloads import load_workload
from surgery.checkpoints.candidates import find_candidates
from surgery.checkpoints.folder import open_checkpoint
from surgery.checkpoints.options import ModelOptions
from surgery.errors import SurgeryError
from surgery.fileio import check_new_file
from surgery.manifest import Manifest, check_ranked_for, load_manifest, save_manifest


def rank(
    out: str | Path,
    *,
    source_stats: str | Path | None = None,
    target_stats: str | Path | None = None,
    source: str | Path | None = None,
    target: str | Path | None = None,
    method: str = "lae",
    seed: int | None = None,
    workload: str | None = None,
    keep: str | None = None,
    candidates_from: str | Path | None = None,
    max_candidates: int | None = None,
    batch_size: int = 8,
    options: ModelOptions | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Rank the candidate modules of a pair into a manifest written to `out`.

    Args:
        out: the manifest to write.
        source_stats, target_stats: stats files from `profile` (needed by the activation methods).
        source, target: the checkpoints; default: the ones the stats files name.
        method: a registered ranking method.
        seed: for methods that need one (`random`).
        workload: a workload with gold solutions, for `taylor` and `swap-nll` (see `load_workload`).
        keep: with those methods, a workload the target must not lose (plain text works, e.g.
            `general-text:48`): each score becomes the module's task gain less its loss on it.
        candidates_from: score only the modules this manifest (of the same pair) ranks, ...
        max_candidates: ... and of those only its top N.
        batch_size: problems per forward pass (`taylor`, `swap-nll`).
        options: how the target is loaded and prompted (`taylor`, `swap-nll`), and trust_remote_code.
        overwrite: replace an existing `out`.

    Returns:
        The manifest written.

    Raises:
        SurgeryError: a checkpoint can be found neither from its argument nor from its stats, or
            `build_manifest` refuses the request.
    """
    options = options or ModelOptions()
    check_new_file(Path(out), overwrite)
    if max_candidates is not None and (candidates_from is None or max_candidates < 1):
        raise SurgeryError("--max-candidates N takes N >= 1 and needs --candidates-from MANIFEST to take them from")
    prompts = load_workload(workload) if workload is not None else None
    kept = load_workload(keep) if keep is not None else None
    stats = {"source": load_stats(source_stats) if source_stats else None}
    stats["target"] = load_stats(target_stats) if target_stats else None
    paths = {"source": source, "target": target}
    for what in paths:
        found = stats[what]
        if paths[what] is None and found is not None:
            paths[what] = found.meta.model.path
        if paths[what] is None:
            weights_only = "/".join(n for n, m in RANKING_METHODS.items() if "stats" not in m.needs)
            raise SurgeryError(f"pass --{what}-stats (or --{what} for --method {weights_only})")
    src, tgt = open_checkpoint(str(paths["source"])), open_checkpoint(str(paths["target"]))
    only, why = None, "not scored"
    if candidates_from is not None:
        prior = load_manifest(candidates_from)
        check_ranked_for(prior, src, tgt, path=candidates_from, forceable=False)
        only = [m.name for m in prior.modules[:max_candidates]]
        why = f"outside the top {len(only)} of {Path(candidates_from).name} ({prior.method.name})"
    manifest = build_manifest(
        method,
        find_candidates(src, tgt, options.trust_remote_code),
        source=src,
        target=tgt,
        src_stats=stats["source"],
        tgt_stats=stats["target"],
        seed=seed,
        workload=prompts,
        options=options,
        batch_size=batch_size,
        only=only,
        only_reason=why,
        keep=kept,
    )
    save_manifest(manifest, out)
    return manifest
