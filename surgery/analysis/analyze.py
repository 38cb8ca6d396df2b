"""Profile the source, free it, profile the target, rank: workload -> manifest in one call.

Methods that measure the task loss instead (`taylor`, `swap-nll`) skip the profiles and rank from the
workload's gold solutions on the target.

Stats are cached next to the manifest (`NAME.source.stats.safetensors`,
`NAME.target.stats.safetensors`), so re-ranking with another method does not regenerate.
"""

from __future__ import annotations

import sys
from pathlib import Path

from surgery.analysis.profiling import profile
from surgery.analysis.ranking import build_manifest, check_needs, get_method, methods_that_need
from surgery.analysis.stats import Requested, Stats, load_stats
from surgery.analysis.workloads import PromptSet, load_workload, require_solutions
from surgery.checkpoints.candidates import find_candidates
from surgery.checkpoints.folder import Checkpoint, open_checkpoint
from surgery.checkpoints.loading import check_generation_options
from surgery.checkpoints.options import ModelOptions
from surgery.errors import SurgeryError
from surgery.fileio import check_new_file
from surgery.manifest import Manifest, save_manifest


def stats_paths(manifest_path: Path) -> tuple[Path, Path]:
    """Where `analyze` caches the two stats files for a manifest path."""
    stem = manifest_path.with_suffix("")
    return (
        stem.with_name(stem.name + ".source.stats.safetensors"),
        stem.with_name(stem.name + ".target.stats.safetensors"),
    )


def _cached(path: Path, ckpt: Checkpoint, prompts: PromptSet, max_new_tokens: int, options: ModelOptions):
    """The cached stats at `path` if they were made for exactly this request, else None."""
    if not path.is_file():
        return None
    try:
        stats = load_stats(path)
    except SurgeryError:
        return None
    meta = stats.meta
    same = (
        meta.model.fingerprint == ckpt.fingerprint
        and meta.workload.sha256 == prompts.sha256
        and meta.settings.max_new_tokens == max_new_tokens
        and meta.requested == Requested(options.chat, options.dtype)
    )
    return stats if same else None


def analyze(
    workload: str,
    out: str | Path,
    *,
    source: str | Path,
    target: str | Path,
    method: str = "taylor",
    seed: int | None = None,
    keep: str | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_memory: str | None = None,
    options: ModelOptions | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Profile both models one at a time on `workload` and write a ranked manifest to `out`.

    Args:
        workload: workload spec (see `surgery.analysis.workloads.load_workload`).
        out: manifest path; stats are cached beside it.
        source: checkpoint that is good at the task.
        target: checkpoint to be patched.
        method: ranking method (see `surgery.analysis.ranking`); `taylor` by default (it needs a workload with
            gold solutions), `lae` for the paper's activation ranking.
        seed: for the `random` method.
        keep: for `taylor` and `swap-nll`, a workload the target must not lose (plain text works, e.g.
            `general-text:48`): each score becomes the module's task gain less its loss on it.
        max_new_tokens, batch_size, max_memory, options: as in `profile` (`options` also for the loss-based
            methods, which load the target themselves).
        overwrite: replace an existing `out` (the cached stats beside it are reused or replaced either way).

    Returns:
        The manifest written; it names the checkpoints by absolute path (a Hub input by its repo id and commit),
        so that it reads the same from any folder.

    Raises:
        SurgeryError: bad settings, an output that exists (without `overwrite`), a workload the method cannot
            use, or a checkpoint that cannot be read.
    """
    options = options or ModelOptions()
    out = Path(out)
    check_new_file(out.absolute(), overwrite)
    # Validate everything before the (slow) profiling starts.
    spec = get_method(method)
    uses_stats = "stats" in spec.needs
    # Stats come from the profiles below; every other need is checked now.
    check_needs(spec, have_stats=True, seed=seed, have_gold=True, have_keep=keep is not None)
    check_generation_options(max_new_tokens, batch_size, max_memory, options.device)
    if out.suffix != ".json":
        raise SurgeryError(f"manifest path {out.absolute()} should end in .json")
    src, tgt = open_checkpoint(source), open_checkpoint(target)
    compat = find_candidates(src, tgt, options.trust_remote_code)
    prompts = load_workload(workload)
    kept = load_workload(keep) if keep is not None else None
    if "gold" in spec.needs:  # refused now, not after the target is loaded
        by_activations = ", ".join(methods_that_need("stats"))
        require_solutions(prompts, f"method {method} (--method {by_activations} rank by activations, with any prompts)")

    stats: dict[str, Stats | None] = {"source": None, "target": None}
    if uses_stats:
        for (what, ckpt), path in zip((("source", src), ("target", tgt)), stats_paths(out), strict=True):
            cached = _cached(path, ckpt, prompts, max_new_tokens, options)
            if cached is not None:
                print(f"{what}: reusing {path}", file=sys.stderr)
                stats[what] = cached
                continue
            # One model at a time: `profile` frees the model before returning.
            stats[what] = profile(
                ckpt.path,
                prompts,
                path,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                max_memory=max_memory,
                options=options,
                overwrite=True,  # a cache entry of ours, stale or from an interrupted run
            )
    manifest = build_manifest(
        method,
        compat,
        source=src,
        target=tgt,
        src_stats=stats["source"],
        tgt_stats=stats["target"],
        seed=seed,
        workload=prompts,
        options=options,
        batch_size=batch_size,
        keep=kept,
    )
    save_manifest(manifest, out)
    return manifest
