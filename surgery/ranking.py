"""Score and rank candidate modules into a manifest.

Methods (named in the manifest):
- `lae`: the paper's signed difference A_src - A_tgt (default).
- `lae-abs`: |A_src - A_tgt|.
- `lae-rel`: |A_src - A_tgt| / (A_src + A_tgt), scale-free across modules.
- `consistency`: mean per-prompt difference over its standard error, so a module whose
  difference holds on every prompt outranks one driven by a single prompt.
- `weight-delta`: ||W_src - W_tgt|| / ||W_tgt|| (Frobenius, over all of a module's tensors),
  streamed from the checkpoints in bounded memory; a baseline that needs no activations.
- `random`: a seeded shuffle; the baseline any method must beat.
"""

from __future__ import annotations

import math
import random

import torch

from surgery import __version__
from surgery.checkpoint import Checkpoint
from surgery.errors import SurgeryError
from surgery.manifest import METHODS, STATS_METHODS, Manifest, Method, ModelRef, ModuleEntry, Workload
from surgery.modules import Compatibility
from surgery.stats import Stats
from surgery.streaming import CHUNK_BYTES, ReadOnlyFiles, tensor_chunks

# Standard-error floor for `consistency`: identical per-prompt differences would divide by 0.
_SE_FLOOR = 1e-12


def check_comparable(src: Stats, tgt: Stats) -> None:
    """Refuse stats files that were not measured on the same prompts with the same settings."""
    for key in ("workload", "settings"):
        a, b = src.meta[key], tgt.meta[key]
        if a != b:
            diff = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise SurgeryError(
                f"stats differ in {key} {diff}: source has {a.get(diff)!r}, target has {b.get(diff)!r}; "
                "profile both models with the same workload and settings"
            )
    if src.modules != tgt.modules:
        raise SurgeryError("stats cover different modules (different architectures); profile a compatible pair")


def check_stats_match(stats: Stats, ckpt: Checkpoint, what: str) -> None:
    if stats.meta["model"]["fingerprint"] != ckpt.fingerprint:
        raise SurgeryError(
            f"{what} stats were measured on {stats.meta['model']['path']}, not {ckpt.path} (fingerprint differs); "
            "profile this checkpoint again"
        )


def stats_scores(method: str, src: Stats, tgt: Stats, names: list[str]) -> dict[str, float]:
    """Score each module from two comparable stats."""
    scores = {}
    for n in names:
        a, b = src.mean[n], tgt.mean[n]
        if method == "lae":
            scores[n] = a - b
        elif method == "lae-abs":
            scores[n] = abs(a - b)
        elif method == "lae-rel":
            scores[n] = abs(a - b) / (a + b) if a + b > 0 else 0.0
        else:  # consistency
            d = src.per_prompt[n] - tgt.per_prompt[n]
            if d.numel() < 2:
                raise SurgeryError("the consistency method needs a workload of at least 2 prompts")
            se = d.std(unbiased=True).item() / math.sqrt(d.numel())
            scores[n] = d.mean().item() / max(se, _SE_FLOOR)
    return scores


def weight_delta_scores(src: Checkpoint, tgt: Checkpoint, compat: Compatibility) -> dict[str, float]:
    """||W_s - W_t|| / ||W_t|| per module, reading both checkpoints in bounded chunks."""
    scores = {}
    elements = CHUNK_BYTES // 8
    with ReadOnlyFiles() as files:
        for c in compat.candidates:
            diff = norm = 0.0
            for t in c.tensors:
                s, g = src.tensors[t], tgt.tensors[t]
                chunks_s = tensor_chunks(
                    files.fd(s.shard.path), s.shard.data_start + s.info.begin, s.info.nbytes, s.info.dtype, elements
                )
                chunks_t = tensor_chunks(
                    files.fd(g.shard.path), g.shard.data_start + g.info.begin, g.info.nbytes, g.info.dtype, elements
                )
                for a, b in zip(chunks_s, chunks_t, strict=True):
                    a64, b64 = a.to(torch.float64), b.to(torch.float64)
                    diff += torch.sum((a64 - b64) ** 2).item()
                    norm += torch.sum(b64**2).item()
            scores[c.name] = math.sqrt(diff) / math.sqrt(norm) if norm > 0 else math.sqrt(diff)
    return scores


def build_manifest(
    method: str,
    src: Checkpoint,
    tgt: Checkpoint,
    compat: Compatibility,
    *,
    src_stats: Stats | None = None,
    tgt_stats: Stats | None = None,
    seed: int | None = None,
    source_label: str | None = None,
    target_label: str | None = None,
) -> Manifest:
    """Score every candidate with `method` and rank them (highest score = rank 1).

    Args:
        method: one of `METHODS`.
        src, tgt: the checkpoints.
        compat: their candidates and exclusions.
        src_stats, tgt_stats: profile stats, required for the activation methods.
        seed: required for `random`.
        source_label, target_label: how to name the models in the manifest (default: their paths, or
            repo ids for Hub snapshots, whose commit is recorded as the revision).

    Returns:
        The manifest; ties keep module order, so ranking is deterministic.
    """
    if method not in METHODS:
        raise SurgeryError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    names = [c.name for c in compat.candidates]
    if not names:
        raise SurgeryError("no transplantable modules to rank; check `surgery compat`")
    params: dict = {}
    workload = None
    if method in STATS_METHODS:
        if src_stats is None or tgt_stats is None:
            raise SurgeryError(f"method {method} needs --source-stats and --target-stats")
        check_comparable(src_stats, tgt_stats)
        check_stats_match(src_stats, src, "source")
        check_stats_match(tgt_stats, tgt, "target")
        missing = [n for n in names if n not in src_stats.mean]
        if missing:
            raise SurgeryError(f"stats lack module {missing[0]}; profile these checkpoints again")
        scores = stats_scores(method, src_stats, tgt_stats, names)
        w = src_stats.meta["workload"]
        workload = Workload(w["name"], w["sha256"], w["prompts"], src_stats.meta["settings"]["max_new_tokens"])
        params = {"settings": src_stats.meta["settings"]}
    elif method == "weight-delta":
        scores = weight_delta_scores(src, tgt, compat)
    else:
        if seed is None:
            raise SurgeryError("method random needs --seed")
        rng = random.Random(seed)
        scores = {n: rng.random() for n in names}
        params = {"seed": seed}

    bad = next((n for n in names if not math.isfinite(scores[n])), None)
    if bad is not None:
        raise SurgeryError(
            f"module {bad} scored {scores[bad]} (non-finite activations or weights); profile with --dtype float32"
        )
    order = sorted(range(len(names)), key=lambda i: (-scores[names[i]], i))
    rank = {names[i]: r + 1 for r, i in enumerate(order)}
    entries = tuple(
        ModuleEntry(
            name=c.name,
            kind=c.kind,
            layer=c.layer,
            tensors=c.tensors,
            shape=c.shape,
            a_src=src_stats.mean[c.name] if workload else None,
            a_tgt=tgt_stats.mean[c.name] if workload else None,
            score=scores[c.name],
            rank=rank[c.name],
        )
        for c in sorted(compat.candidates, key=lambda c: rank[c.name])
    )
    return Manifest(
        created_by=f"surgery {__version__}",
        source=_model_ref(src, source_label),
        target=_model_ref(tgt, target_label),
        workload=workload,
        method=Method(method, params),
        modules=entries,
        excluded=tuple((e.name, e.reason) for e in compat.excluded),
    )


def _model_ref(ckpt: Checkpoint, label: str | None) -> ModelRef:
    # A Hub snapshot is named by its repo id and pinned by its commit: its cache path is machine-specific.
    if ckpt.hub is not None:
        return ModelRef(label or ckpt.hub.repo_id, ckpt.hub.commit, ckpt.fingerprint)
    return ModelRef(label or str(ckpt.path), None, ckpt.fingerprint)
