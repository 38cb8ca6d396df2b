"""Rank from existing stats files (or from weights alone) and write the manifest: `surgery manifest`."""

from __future__ import annotations

from pathlib import Path

from surgery.analysis.ranking import RANKING_METHODS, build_manifest
from surgery.analysis.stats import load_stats
from surgery.checkpoints.candidates import find_candidates
from surgery.checkpoints.folder import open_checkpoint
from surgery.errors import SurgeryError
from surgery.manifest import Manifest, save_manifest


def rank(
    out: str | Path,
    *,
    source_stats: str | Path | None = None,
    target_stats: str | Path | None = None,
    source: str | Path | None = None,
    target: str | Path | None = None,
    method: str = "lae",
    seed: int | None = None,
    trust_remote_code: bool = False,
) -> Manifest:
    """Rank the candidate modules of a pair into a manifest written to `out`.

    Args:
        out: the manifest to write.
        source_stats, target_stats: stats files from `profile` (needed by the activation methods).
        source, target: the checkpoints; default: the ones the stats files name.
        method: a registered ranking method.
        seed: for methods that need one (`random`).
        trust_remote_code: allow configs that need custom model code.

    Returns:
        The manifest written.

    Raises:
        SurgeryError: a checkpoint can be found neither from its argument nor from its stats, or
            `build_manifest` refuses the request.
    """
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
    manifest = build_manifest(
        method,
        src,
        tgt,
        find_candidates(src, tgt, trust_remote_code),
        src_stats=stats["source"],
        tgt_stats=stats["target"],
        seed=seed,
        source_label=str(paths["source"]),
        target_label=str(paths["target"]),
    )
    save_manifest(manifest, out)
    return manifest
