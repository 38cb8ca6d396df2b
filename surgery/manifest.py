"""The module manifest: the JSON contract between analysis and transplant.

A manifest ranks every transplantable module of a source/target pair. It is validated
against `manifests/schema.json` on load, and selection (top-K, kind, layers, names)
happens here so that `transplant`, `sweep` and the Python API all select the same way.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from surgery.errors import SurgeryError
from surgery.fileio import read_json_object, write_json_atomic

if TYPE_CHECKING:
    from surgery.checkpoints.folder import Checkpoint

SCHEMA_VERSION = 1
KINDS = ("attn", "mlp", "other")


@dataclass(frozen=True)
class ModelRef:
    path: str
    revision: str | None
    fingerprint: str


@dataclass(frozen=True)
class Workload:
    name: str
    sha256: str
    prompts: int
    max_new_tokens: int


@dataclass(frozen=True)
class Method:
    name: str
    params: dict


@dataclass(frozen=True)
class ModuleEntry:
    """One ranked module. `a_src`/`a_tgt` are None for methods without activations.

    `task_gain`/`keep_loss`: the two parts of a score traded against a keep workload (`--keep`), score =
    task_gain - keep_loss; None (and absent from the file) for a score of the task alone.
    """

    name: str
    kind: str
    layer: int | None
    tensors: tuple[str, ...]
    shape: tuple[int, ...]
    a_src: float | None
    a_tgt: float | None
    score: float
    rank: int
    task_gain: float | None = None
    keep_loss: float | None = None

    def to_dict(self) -> dict:
        """The module as the manifest writes it: the parts of a keep-traded score only where it has them."""
        obj = {**asdict(self), "tensors": list(self.tensors), "shape": list(self.shape)}
        parts = ("task_gain", "keep_loss")
        return {k: v for k, v in obj.items() if not (k in parts and v is None)}


@dataclass(frozen=True)
class KeepPoint:
    """What a patched model keeps of the target on one keep set (`evaluation.metrics.Retention`, as recorded).

    `pct` is Retention % with its interval (100: the target's own, 0: a full rollback); None where the target has
    no advantage on the set, and `undefined` says why. `nll_change` (patched - target, nats per token, with its
    interval) is recorded either way: a regression check.
    """

    keep: str
    pct: float | None
    ci95: tuple[float, float] | None
    nll_change: float
    nll_change_ci95: tuple[float, float]
    undefined: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> KeepPoint:
        ci = d["ci95"]
        return cls(d["keep"], d["pct"], tuple(ci) if ci else None, d["nll_change"], tuple(d["nll_change_ci95"]),
                   d.get("undefined"))  # type: ignore[arg-type]  # fmt: skip


@dataclass(frozen=True)
class CurvePoint:
    """One K (and alpha) of a selection curve: the metric on the validation problems, the Recovery it means,
    and with keep sets, what it keeps of the target on each. `alpha` < 1 is a blend (`transplant --alpha`)."""

    k: int
    value: float
    recovery: float | None
    recovery_ci95: tuple[float, float] | None
    alpha: float = 1.0
    retention: tuple[KeepPoint, ...] = ()

    def to_dict(self) -> dict:
        """The point as the manifest writes it: `alpha` and `retention` only where they say something."""
        d: dict = {"k": self.k, "value": self.value, "recovery": self.recovery}
        d["recovery_ci95"] = list(self.recovery_ci95) if self.recovery_ci95 else None
        if self.alpha != 1:
            d["alpha"] = self.alpha
        if self.retention:
            d["retention"] = [
                {**asdict(r), "ci95": list(r.ci95) if r.ci95 else None, "nll_change_ci95": list(r.nll_change_ci95)}
                for r in self.retention
            ]
        return d


@dataclass(frozen=True)
class Selection:
    """The K `surgery select` chose on held-out problems.

    Attributes:
        k: the chosen K.
        rule: how it was chosen, in words.
        metric: `nll` (gold-solution NLL) or `accuracy`.
        validation: the validation workload (name, sha256 of its prompts, count).
        baselines: the metric of the source and of the target on it.
        curve: every K (and alpha) measured.
        alpha: the chosen blend (1: a copy), which `transplant` takes from here as it takes `k`.
        keep: the keep sets Retention was measured on (name, sha256, count), in the order of each point's.
        min_retention: the Retention every keep set had to keep, in percent (None: not asked).
    """

    k: int
    rule: str
    metric: str
    validation: dict[str, object]
    baselines: dict[str, float]
    curve: tuple[CurvePoint, ...]
    alpha: float = 1.0
    keep: tuple[dict[str, object], ...] = ()
    min_retention: float | None = None

    def to_dict(self) -> dict:
        """The selection as the manifest writes it: `alpha`, `keep` and `min_retention` only where they are set."""
        d = {
            "k": self.k,
            "rule": self.rule,
            "metric": self.metric,
            "validation": dict(self.validation),
            "baselines": dict(self.baselines),
            "curve": [p.to_dict() for p in self.curve],
        }
        if self.alpha != 1:
            d["alpha"] = self.alpha
        if self.keep:
            d["keep"] = [dict(k) for k in self.keep]
        if self.min_retention is not None:
            d["min_retention"] = self.min_retention
        return d


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. `modules` are sorted by rank (1 = transplant first)."""

    created_by: str
    source: ModelRef
    target: ModelRef
    workload: Workload | None
    method: Method
    modules: tuple[ModuleEntry, ...]
    excluded: tuple[tuple[str, str], ...]
    selection: Selection | None = None

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "created_by": self.created_by,
            "source": asdict(self.source),
            "target": asdict(self.target),
            "workload": asdict(self.workload) if self.workload else None,
            "method": {"name": self.method.name, "params": self.method.params},
            "modules": [m.to_dict() for m in self.modules],
            "excluded": [{"name": n, "reason": r} for n, r in self.excluded],
            **({"selection": self.selection.to_dict()} if self.selection else {}),
        }


def schema() -> dict:
    """The manifest JSON schema (also at `manifests/schema.json`)."""
    return json.loads(resources.files("surgery").joinpath("manifest.schema.json").read_text())


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest file and validate it against the schema.

    Args:
        path: the manifest JSON file.

    Returns:
        The manifest, modules sorted by rank.

    Raises:
        SurgeryError: the file is missing, not JSON, of another schema version, or
            invalid against the schema (each message names it by its absolute path).
    """
    path = Path(path).absolute()
    obj = read_json_object(path, "manifest", "check the path, or regenerate it with surgery")
    return manifest_from_dict(obj, str(path))


def manifest_from_dict(obj: object, where: str = "manifest") -> Manifest:
    """Validate a parsed manifest (see `load_manifest`)."""
    import jsonschema

    version = obj.get("schema_version") if isinstance(obj, dict) else None
    if version != SCHEMA_VERSION:
        raise SurgeryError(
            f"{where}: schema_version {version!r} is not supported (this surgery reads version {SCHEMA_VERSION}); "
            "regenerate the manifest with this version of surgery"
        )
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(obj))
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise SurgeryError(f"{where}: invalid manifest at {at}: {error.message}; see manifests/schema.json")

    modules = sorted(
        (
            ModuleEntry(
                name=m["name"],
                kind=m["kind"],
                layer=m["layer"],
                tensors=tuple(m["tensors"]),
                shape=tuple(m["shape"]),
                a_src=m["a_src"],
                a_tgt=m["a_tgt"],
                score=m["score"],
                rank=m["rank"],
                task_gain=m.get("task_gain"),
                keep_loss=m.get("keep_loss"),
            )
            for m in obj["modules"]
        ),
        key=lambda m: m.rank,
    )
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SurgeryError(f"{where}: module {dup!r} is listed twice; each module must appear once")
    if [m.rank for m in modules] != list(range(1, len(modules) + 1)):
        raise SurgeryError(f"{where}: ranks must be 1..{len(modules)} with no gaps or ties")
    workload = obj["workload"]
    return Manifest(
        created_by=obj["created_by"],
        source=ModelRef(**obj["source"]),
        target=ModelRef(**obj["target"]),
        workload=Workload(**workload) if workload else None,
        method=Method(name=obj["method"]["name"], params=obj["method"].get("params", {})),
        modules=tuple(modules),
        excluded=tuple((e["name"], e["reason"]) for e in obj["excluded"]),
        selection=_selection(obj["selection"]) if "selection" in obj else None,
    )


def _selection(obj: dict) -> Selection:
    curve = tuple(
        CurvePoint(
            p["k"],
            p["value"],
            p["recovery"],
            tuple(p["recovery_ci95"]) if p["recovery_ci95"] else None,  # type: ignore[arg-type]
            p.get("alpha", 1.0),
            tuple(KeepPoint.from_dict(r) for r in p.get("retention", ())),
        )
        for p in obj["curve"]
    )
    return Selection(
        obj["k"],
        obj["rule"],
        obj["metric"],
        obj["validation"],
        obj["baselines"],
        curve,
        obj.get("alpha", 1.0),
        tuple(obj.get("keep", ())),
        obj.get("min_retention"),
    )


def ranked_elsewhere(manifest: Manifest, source: Checkpoint, target: Checkpoint) -> str | None:
    """Which of `source` and `target` the manifest was not ranked for, as a message; None when both match.

    It names each checkpoint that differs (the source, the target, or both), as the manifest records it
    and as it was passed: `manifest was made for target A (sha256:…), not B`.
    """
    differ = [
        (what, ref, ckpt)
        for what, ref, ckpt in (("source", manifest.source, source), ("target", manifest.target, target))
        if ref.fingerprint != ckpt.fingerprint
    ]
    if not differ:
        return None
    made = " and ".join(f"{what} {ref.path} ({ref.fingerprint[:19]}…)" for what, ref, _ in differ)
    return f"manifest was made for {made}, not {' and '.join(str(ckpt.path) for _, _, ckpt in differ)}"


def check_ranked_for(
    manifest: Manifest,
    source: Checkpoint,
    target: Checkpoint,
    force: bool = False,
    *,
    path: str | Path | None = None,
    forceable: bool = True,
) -> None:
    """Refuse a manifest ranked for other checkpoints (see `ranked_elsewhere`); with `force`, warn and go on.

    The one check of every command that takes a manifest with a pair (`transplant`, `sweep`, `select`,
    `manifest --candidates-from`), with one message.

    Args:
        manifest, source, target: the manifest and the pair it is used with.
        force: warn instead of refusing.
        path: the manifest's file, named first in the message.
        forceable: whether the command has `--force`; the message offers it only then.

    Raises:
        SurgeryError: the fingerprints differ and `force` is off.
    """
    msg = ranked_elsewhere(manifest, source, target)
    if msg is None:
        return
    if path is not None:
        msg = f"{Path(path).absolute()}: {msg}"
    if not force:
        offer = ", or --force to use it anyway" if forceable else ""
        raise SurgeryError(f"{msg}; pass the checkpoints it was made for{offer}")
    print(f"warning: {msg}; continuing because of --force", file=sys.stderr)


def save_manifest(manifest: Manifest, path: str | Path) -> None:
    """Validate and write a manifest atomically (a temp file renamed into place)."""
    obj = manifest.to_dict()
    manifest_from_dict(obj, str(path))
    write_json_atomic(Path(path), obj)


def file_sha256(path: str | Path) -> str:
    """sha256 of a (small) file's bytes, as recorded in provenance."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Selectable(Protocol):
    name: str
    kind: str
    layer: int | None


T = TypeVar("T", bound=Selectable)


def parse_layer_range(text: str) -> tuple[int, int]:
    """Parse `A-B` (inclusive) or `A` into a layer range.

    Raises:
        SurgeryError: the text is not a range of non-negative integers with A <= B.
    """
    lo, sep, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise SurgeryError(f"layer range {text!r} is not of the form A-B (e.g. 0-11) or A") from None
    if a < 0 or b < a:
        raise SurgeryError(f"layer range {text!r} is empty or negative; use A-B with 0 <= A <= B")
    return a, b


def select_modules(
    modules: Sequence[T],
    top_k: int | None = None,
    only: str | None = None,
    layers: tuple[int, int] | None = None,
    patterns: Sequence[str] = (),
) -> list[T]:
    """Select modules: filter by kind, layers and name patterns, then take the first K.

    Args:
        modules: manifest entries in rank order, or candidates in module order.
        top_k: keep the first K modules left after filtering; None keeps all.
        only: keep one kind (`attn`, `mlp` or `other`).
        layers: keep layers in this inclusive range.
        patterns: keep modules whose name matches any glob pattern (exact names work too).

    Returns:
        The selected modules, in input order.

    Raises:
        SurgeryError: K <= 0 or more than the modules available, an unknown kind, or a
            pattern that matches no module.
    """
    if only is not None and only not in KINDS:
        raise SurgeryError(f"unknown module kind {only!r}; use one of {', '.join(KINDS)}")
    chosen = [
        m
        for m in modules
        if (only is None or m.kind == only)
        and (layers is None or (m.layer is not None and layers[0] <= m.layer <= layers[1]))
    ]
    if layers is not None and not any(m.layer is not None and layers[0] <= m.layer <= layers[1] for m in modules):
        # Name the filter that emptied the selection, and what would match (not "use --top-k 0 or fewer").
        present = sorted({m.layer for m in modules if m.layer is not None})
        have = f"layers {present[0]}-{present[-1]}" if present else "no numbered layers"
        raise SurgeryError(f"--layers {layers[0]}-{layers[1]} matches no layer; this model has {have}")
    if only is not None and not chosen:
        raise SurgeryError(f"--only {only} leaves no module in this selection; drop --only or widen --layers")
    if patterns:
        for p in patterns:
            if not any(fnmatch.fnmatchcase(m.name, p) for m in chosen):
                raise SurgeryError(
                    f"--module pattern {p!r} matches no transplantable module; run `surgery compat` to list them"
                )
        chosen = [m for m in chosen if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)]
    if top_k is not None:
        if top_k <= 0:
            raise SurgeryError(f"--top-k must be a positive integer, got {top_k}")
        if top_k > len(chosen):
            raise SurgeryError(
                f"--top-k {top_k} is more than the {len(chosen)} modules available after filtering; "
                f"use --top-k {len(chosen)} or fewer"
            )
        chosen = chosen[:top_k]
    if not chosen:
        raise SurgeryError("the selection is empty; loosen --only/--layers or check the manifest")
    return chosen
