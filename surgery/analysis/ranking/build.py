"""Score every candidate with a registered method and rank them into a manifest."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import TYPE_CHECKING

from surgery.analysis.ranking.params import KeepRef
from surgery.analysis.ranking.registry import KeepScore, RankContext, check_needs, get_method
from surgery.analysis.workloads import require_solutions
from surgery.checkpoints.options import ModelOptions
from surgery.errors import SurgeryError
from surgery.manifest import Manifest, Method, ModelRef, ModuleEntry, Workload
from surgery.version import __version__

if TYPE_CHECKING:
    from surgery.analysis.stats import Stats
    from surgery.analysis.workloads import PromptSet
    from surgery.checkpoints.candidates import Compatibility
    from surgery.checkpoints.folder import Checkpoint


def check_comparable(src: Stats, tgt: Stats) -> None:
    """Refuse stats files that were not measured on the same prompts with the same settings."""
    for key in ("workload", "settings"):
        a, b = asdict(getattr(src.meta, key)), asdict(getattr(tgt.meta, key))
        if a != b:
            diff = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise SurgeryError(
                f"stats differ in {key} {diff}: source has {a.get(diff)!r}, target has {b.get(diff)!r}; "
                "profile both models with the same workload and settings"
            )
    if src.modules != tgt.modules:
        raise SurgeryError("stats cover different modules (different architectures); profile a compatible pair")


def check_stats_match(stats: Stats, ckpt: Checkpoint, what: str) -> None:
    """Refuse stats measured on another checkpoint than `ckpt`."""
    if stats.meta.model.fingerprint != ckpt.fingerprint:
        raise SurgeryError(
            f"{what} stats were measured on {stats.meta.model.path}, not {ckpt.path} (fingerprint differs); "
            "profile this checkpoint again"
        )


def build_manifest(
    method: str,
    compat: Compatibility,
    *,
    source: Checkpoint,
    target: Checkpoint,
    src_stats: Stats | None = None,
    tgt_stats: Stats | None = None,
    seed: int | None = None,
    workload: PromptSet | None = None,
    options: ModelOptions | None = None,
    batch_size: int = 8,
    only: Sequence[str] | None = None,
    only_reason: str = "not scored",
    keep: PromptSet | None = None,
) -> Manifest:
    """Score every candidate with `method` and rank them (highest score = rank 1).

    Args:
        method: a registered method (`surgery.analysis.ranking.RANKING_METHODS`).
        compat: the candidates and exclusions of the pair.
        source, target: the checkpoints.
        src_stats, tgt_stats: profile stats, required by methods that need `stats`.
        seed: required by methods that need `seed` (`random`).
        workload: prompts with gold solutions, for methods that need `gold` (`taylor`, `swap-nll`).
        options: how those methods load and prompt the target (default `ModelOptions()`).
        batch_size: problems per forward pass for those methods.
        only: score only these candidates; the others go to `excluded` with `only_reason`.
        keep: what the target must not lose (a workload with solutions; plain text has them), for the
            methods that take one (`methods_taking_keep`): each score is then the module's task gain less
            its loss on `keep`, both recorded beside it, and `method.params` records `keep`'s name and sha256.

    Returns:
        The manifest; ties keep module order, so ranking is deterministic.

    Raises:
        SurgeryError: unknown method, a missing need, a keep workload the method cannot use or without
            solutions, stats of other checkpoints, or non-finite scores.

    Example:
        >>> m = build_manifest("weight-delta", find_candidates(src, tgt), source=src, target=tgt)  # doctest: +SKIP
        >>> m.modules[0].name  # doctest: +SKIP
        'model.layers.3.mlp.down_proj'
    """
    spec = get_method(method)
    names = [c.name for c in compat.candidates]
    if not names:
        raise SurgeryError("no transplantable modules to rank; check `surgery compat`")
    uses_stats = "stats" in spec.needs
    uses_gold = "gold" in spec.needs
    check_needs(
        spec,
        have_stats=src_stats is not None and tgt_stats is not None,
        seed=seed,
        have_gold=workload is not None,
        have_keep=keep is not None,
    )
    if uses_gold:
        assert workload is not None
        require_solutions(workload, f"method {method}")
    if keep is not None and keep.solutions is None:
        raise SurgeryError(
            f"keep workload {keep.name} has no solutions to measure the NLL of; use plain text (general-text:N, "
            'stdlib-docs:N, or a JSONL of {"text": ...} lines) or prompts with solutions'
        )
    options = options or ModelOptions()
    recorded = None  # the workload as the manifest records it
    if uses_stats:
        assert src_stats is not None and tgt_stats is not None
        check_comparable(src_stats, tgt_stats)
        check_stats_match(src_stats, source, "source")
        check_stats_match(tgt_stats, target, "target")
        missing = [n for n in names if n not in src_stats.mean]
        if missing:
            raise SurgeryError(f"stats lack module {missing[0]}; profile these checkpoints again")
        w = src_stats.meta.workload
        recorded = Workload(w.name, w.sha256, w.prompts, src_stats.meta.settings.max_new_tokens)
    if uses_gold:
        assert workload is not None
        # Teacher-forced on the gold solutions: nothing is generated, so max_new_tokens is 0.
        recorded = Workload(workload.name, workload.sha256, len(workload.prompts), 0)
    # Each declared parameter is the request value of its name (the needs check above made it present).
    request = {
        "settings": src_stats.meta.settings if src_stats is not None else None,
        "seed": seed,
        "dtype": options.dtype,
        "chat": options.chat,
        "keep": KeepRef(keep.name, keep.sha256) if keep is not None else None,
    }
    params = spec.params(**{f.name: request[f.name] for f in fields(spec.params)})
    ctx = RankContext(
        source=source,
        target=target,
        compat=compat,
        params=params,
        src_stats=src_stats if uses_stats else None,
        tgt_stats=tgt_stats if uses_stats else None,
        workload=workload if uses_gold else None,
        options=options,
        batch_size=batch_size,
        only=frozenset(only) if only is not None else None,
        keep=keep,
    )
    scored = ctx.candidates
    if not scored:
        raise SurgeryError(f"none of the requested modules is a candidate ({only_reason}); check `surgery compat`")
    scored_as = spec.score(ctx)
    parts = {n: v for n, v in scored_as.items() if isinstance(v, KeepScore)}
    scores = {n: v.score if isinstance(v, KeepScore) else v for n, v in scored_as.items()}

    bad = next((c.name for c in scored if not math.isfinite(scores[c.name])), None)
    if bad is not None:
        raise SurgeryError(
            f"module {bad} scored {scores[bad]} (non-finite activations or weights); profile with --dtype float32"
        )
    order = sorted(range(len(scored)), key=lambda i: (-scores[scored[i].name], i))
    entries = tuple(
        ModuleEntry(
            name=c.name,
            kind=c.kind,
            layer=c.layer,
            tensors=c.tensors,
            shape=c.shape,
            a_src=src_stats.mean[c.name] if ctx.src_stats is not None else None,
            a_tgt=tgt_stats.mean[c.name] if ctx.tgt_stats is not None else None,
            score=scores[c.name],
            rank=rank,
            task_gain=parts[c.name].task_gain if c.name in parts else None,
            keep_loss=parts[c.name].keep_loss if c.name in parts else None,
        )
        for rank, c in enumerate((scored[i] for i in order), 1)
    )
    unscored = tuple((c.name, only_reason) for c in compat.candidates if c not in scored)
    return Manifest(
        created_by=f"surgery {__version__}",
        source=_model_ref(source),
        target=_model_ref(target),
        workload=recorded,
        # A parameter the request left None is not recorded: a ranking without --keep reads as it always has.
        method=Method(method, asdict(params, dict_factory=lambda kv: {k: v for k, v in kv if v is not None})),
        modules=entries,
        excluded=tuple((e.name, e.reason) for e in compat.excluded) + unscored,
    )


def _model_ref(ckpt: Checkpoint) -> ModelRef:
    # A Hub snapshot is named by its repo id and pinned by its commit: its cache path is machine-specific.
    # A folder is named by its absolute path, so that the manifest reads the same from any folder.
    if ckpt.hub is not None:
        return ModelRef(ckpt.hub.repo_id, ckpt.hub.commit, ckpt.fingerprint)
    return ModelRef(str(ckpt.path.absolute()), None, ckpt.fingerprint)
