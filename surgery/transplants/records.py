"""The records surgery writes beside what it made: `transplant.json` in an output, `patch.json` in a patch.

Each record is a frozen dataclass: `to_dict` is the JSON object written (the same keys, in the same
order, as surgery has always written them) and `from_dict` reads one back, refusing a malformed one in
one line. Fields that not every record has are optional, so that records of older versions load: a
transplant's `selection`, `linked_shards` and `linked_sha256` (`--link`) and `patch` (written by `apply`),
a patch's `target_config`, and both records' `alpha` (`--alpha`: written only for a blend, so that a plain
transplant's record stays what it always was; absent, it is 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoints.files import RECORD_FILE
from surgery.checkpoints.folder import Checkpoint
from surgery.checkpoints.hub_inputs import HubRef
from surgery.errors import SurgeryError
from surgery.version import __version__

PATCH_RECORD = "patch.json"
PATCH_FORMAT = "surgery-patch"
PATCH_VERSION = 1
# How a refusal of a broken transplant record ends.
RECORD_FIX = "rerun `surgery transplant`"
# The command that writes a patch, and how a refusal of a broken patch folder ends.
_WRITE_PATCH = "surgery transplant --patch"
PATCH_FIX = f"rewrite it with `{_WRITE_PATCH}`"


def patch_fix(reversible: bool) -> str:
    """How a refusal of a broken patch ends: the command that writes it again, `--reversible` included."""
    return f"rewrite it with `{_WRITE_PATCH} --reversible`" if reversible else PATCH_FIX


def _field(d: dict, key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    """`d[key]`, which must be of `kind` (or absent or None if `optional`): a KeyError or TypeError naming it."""
    if not isinstance(d, dict):
        raise TypeError(f"an object holding {key!r}")
    value = d.get(key) if optional else d[key]
    if not (isinstance(value, kind) or (optional and value is None)):
        raise TypeError(key)
    return value


def _alpha(d: dict) -> float:
    """`d["alpha"]`, the source's weight in a blend: a number in (0, 1], and 1 (a copy) where absent."""
    value = d.get("alpha", 1)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise TypeError("alpha")
    return float(value)


def _alpha_dict(alpha: float) -> dict:
    """A record's `alpha` key: only for a blend (alpha below 1)."""
    return {"alpha": alpha} if alpha != 1 else {}


def _strings(d: dict, key: str, optional: bool = False) -> tuple[str, ...] | None:
    """`d[key]` as a tuple of strings (None where `optional` and it is absent or null)."""
    values = _field(d, key, list, optional)
    if values is None:
        return None
    if not all(isinstance(v, str) for v in values):
        raise TypeError(key)
    return tuple(values)


@dataclass(frozen=True)
class Origin:
    """An input as a record names it: its folder and fingerprint, and for a Hub snapshot its repo and commit."""

    path: str
    fingerprint: str
    hub: HubRef | None = None

    @classmethod
    def of(cls, ckpt: Checkpoint) -> Origin:
        """How a record names `ckpt` (a Hub snapshot's path is a cache path: its repo and commit say more)."""
        return cls(str(ckpt.path), ckpt.fingerprint, ckpt.hub)

    @property
    def named(self) -> str:
        """The input as a person would pass it again: its Hub repo at the commit, else its folder."""
        return f"{self.hub.repo_id}@{self.hub.commit}" if self.hub is not None else self.path

    def to_dict(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint, **({"hub": asdict(self.hub)} if self.hub else {})}

    @classmethod
    def from_dict(cls, d: dict) -> Origin:
        hub = _field(d, "hub", dict, optional=True)
        ref = None
        if hub is not None:
            ref = HubRef(_field(hub, "repo_id", str), _field(hub, "revision", str, True), _field(hub, "commit", str))
        return cls(_field(d, "path", str), _field(d, "fingerprint", str), ref)


@dataclass(frozen=True)
class ManifestRef:
    """The manifest modules were chosen from: its path as given, its sha256 and its ranking method."""

    path: str
    sha256: str
    method: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ManifestRef:
        return cls(_field(d, "path", str), _field(d, "sha256", str), _field(d, "method", str))


@dataclass(frozen=True)
class Provenance:
    """What an output was made from and by: recorded in both records and in every shard header it writes."""

    source: Origin
    target: Origin
    manifest: ManifestRef | None
    tool: str = f"surgery {__version__}"

    def to_dict(self) -> dict:
        manifest = self.manifest.to_dict() if self.manifest is not None else None
        source, target = self.source.to_dict(), self.target.to_dict()
        return {"tool": self.tool, "source": source, "target": target, "manifest": manifest}

    @classmethod
    def from_dict(cls, d: dict) -> Provenance:
        manifest = _field(d, "manifest", dict, optional=True)
        return cls(
            Origin.from_dict(_field(d, "source", dict)),
            Origin.from_dict(_field(d, "target", dict)),
            ManifestRef.from_dict(manifest) if manifest is not None else None,
            _field(d, "tool", str),
        )


@dataclass(frozen=True)
class SelectionOptions:
    """How the modules were selected (`transplant`'s options), as recorded and shown in the card.

    `top_k_from` says where a K not given with `--top-k` came from (a K chosen by `surgery select`).
    """

    top_k: int | None = None
    only: str | None = None
    layers: tuple[int, int] | None = None
    patterns: tuple[str, ...] = ()
    top_k_from: str | None = None

    def to_dict(self) -> dict:
        return {
            "top_k": self.top_k,
            **({"top_k_from": self.top_k_from} if self.top_k_from else {}),
            "only": self.only,
            "layers": list(self.layers) if self.layers else None,
            "patterns": list(self.patterns),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SelectionOptions:
        layers = _field(d, "layers", list, optional=True)
        if layers is not None and (len(layers) != 2 or not all(type(x) is int for x in layers)):
            raise TypeError("layers")
        top_k = _field(d, "top_k", int, optional=True)
        return cls(
            top_k,
            _field(d, "only", str, optional=True),
            (layers[0], layers[1]) if layers is not None else None,
            _strings(d, "patterns") or (),
            _field(d, "top_k_from", str, optional=True),
        )


@dataclass(frozen=True)
class CopiedTensor:
    """A tensor an output took from the source: its dtype there and in the output, and the sha256 written."""

    name: str
    dtype: str
    source_dtype: str
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CopiedTensor:
        return cls(*(_field(d, k, str) for k in ("name", "dtype", "source_dtype", "sha256")))


@dataclass(frozen=True)
class PatchRef:
    """The patch an output was applied from: its folder and the sha256 of its `patch.json`."""

    path: str
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PatchRef:
        return cls(_field(d, "path", str), _field(d, "sha256", str))


@dataclass(frozen=True)
class TransplantRecord:
    """`transplant.json`: what an output was made from, what it took, and the sha256 of what it wrote.

    Attributes:
        provenance: tool, source, target and manifest.
        selection: the selection options (None in a record without them).
        modules: the transplanted modules, in selection order.
        tensors: the tensors taken from the source, by name.
        patch: the patch it was applied from (`apply`), if any.
        linked_shards: the shards hard-linked to the target's files (`--link`; None without it).
        linked_sha256: their tensors' sha256 when they were linked (None in records older than it).
        alpha: the source's weight (`--alpha`): each of `tensors` is `target + alpha * (source - target)`,
            in float32 rounded to the target's dtype; 1 is a copy.
    """

    provenance: Provenance
    selection: SelectionOptions | None
    modules: tuple[str, ...]
    tensors: tuple[CopiedTensor, ...] = ()
    patch: PatchRef | None = None
    linked_shards: tuple[str, ...] | None = None
    linked_sha256: dict[str, str] | None = None
    alpha: float = 1.0

    def to_dict(self) -> dict:
        """The `transplant.json` object."""
        return {
            **self.provenance.to_dict(),
            **({"selection": self.selection.to_dict()} if self.selection is not None else {}),
            "modules": list(self.modules),
            **_alpha_dict(self.alpha),
            **({"patch": self.patch.to_dict()} if self.patch is not None else {}),
            **({"linked_shards": list(self.linked_shards)} if self.linked_shards is not None else {}),
            **({"linked_sha256": dict(self.linked_sha256)} if self.linked_sha256 is not None else {}),
            "tensors": [t.to_dict() for t in self.tensors],
        }

    @classmethod
    def from_dict(cls, d: dict, file: Path | None = None) -> TransplantRecord:
        """Read a `transplant.json` object (from `file`, for messages).

        Raises:
            SurgeryError: a field is missing or mistyped.
        """
        try:
            patch = _field(d, "patch", dict, optional=True)
            selection = _field(d, "selection", dict, optional=True)
            linked_sha256 = _field(d, "linked_sha256", dict, optional=True)
            if linked_sha256 is not None and not all(isinstance(v, str) for v in linked_sha256.values()):
                raise TypeError("linked_sha256")
            return cls(
                Provenance.from_dict(d),
                SelectionOptions.from_dict(selection) if selection is not None else None,
                _strings(d, "modules") or (),
                tuple(CopiedTensor.from_dict(t) for t in _field(d, "tensors", list)),
                PatchRef.from_dict(patch) if patch is not None else None,
                _strings(d, "linked_shards", optional=True),
                linked_sha256,
                _alpha(d),
            )
        except (KeyError, TypeError) as e:
            raise SurgeryError(
                f"{file or RECORD_FILE}: malformed record ({e!r} missing or mistyped); {RECORD_FIX}"
            ) from None


@dataclass(frozen=True)
class Architecture:
    """What a patch records of its target's config to refuse another architecture by name."""

    model_type: str | None
    architectures: tuple[str, ...] | None

    @classmethod
    def of(cls, config: dict) -> Architecture:
        """The architecture `config` names."""
        names = config.get("architectures")
        return cls(config.get("model_type"), tuple(names) if isinstance(names, list) else None)

    def differs(self, other: Architecture) -> bool:
        """Whether `other` is another architecture: another model type, or other `architectures` where both
        name them (a model built from a config may leave them empty)."""
        names = self.architectures and other.architectures
        return other.model_type != self.model_type or bool(names and other.architectures != self.architectures)

    def __str__(self) -> str:
        return f"{self.model_type} {self.to_dict()['architectures']}"

    def to_dict(self) -> dict:
        names = list(self.architectures) if self.architectures is not None else None
        return {"model_type": self.model_type, "architectures": names}

    @classmethod
    def from_dict(cls, d: dict) -> Architecture:
        return cls(_field(d, "model_type", str, optional=True), _strings(d, "architectures", optional=True))


@dataclass(frozen=True)
class PatchedTensor:
    """A tensor of a patch as its record lists it: the target's dtype and shape, the source's dtype, and the
    sha256 of the patch's bytes and of the target's."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source_dtype: str
    sha256: str
    target_sha256: str

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> PatchedTensor:
        shape = _field(d, "shape", list)
        if not all(type(x) is int for x in shape):
            raise TypeError("shape")
        name, dtype = _field(d, "name", str), _field(d, "dtype", str)
        return cls(name, dtype, tuple(shape), *(_field(d, k, str) for k in ("source_dtype", "sha256", "target_sha256")))


@dataclass(frozen=True)
class Originals:
    """What `apply --revert` needs besides the tensors to give the target back byte for byte."""

    shard_headers: dict[str, str]
    index: str | None
    card: str | None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Originals:
        headers = _field(d, "shard_headers", dict)
        if not all(isinstance(v, str) for v in headers.values()):
            raise TypeError("shard_headers")
        return cls(headers, _field(d, "index", str, optional=True), _field(d, "card", str, optional=True))


@dataclass(frozen=True)
class PatchRecord:
    """`patch.json`: what a patch was made from and for, and what it holds.

    Attributes:
        provenance: tool, source, target and manifest.
        selection: the selection options.
        modules: the patched modules, in selection order.
        architecture: the target's model type and architectures.
        target_config: the target's config.json (None in patches older than it).
        files: the patch's tensor files.
        original_files: a reversible patch's files of the target's original tensors (else None).
        tensors: the patch's tensors, in name order.
        card: the card of the checkpoint the patch makes.
        original: a reversible patch's original shard headers, index and card (else None).
        alpha: the source's weight (`--alpha`): the patch's tensors are `target + alpha * (source - target)`,
            in float32 rounded to the target's dtype; 1 is a copy.
    """

    provenance: Provenance
    selection: SelectionOptions
    modules: tuple[str, ...]
    architecture: Architecture
    target_config: dict | None
    files: tuple[str, ...]
    original_files: tuple[str, ...] | None
    tensors: tuple[PatchedTensor, ...]
    card: str
    original: Originals | None
    alpha: float = 1.0

    @property
    def fix(self) -> str:
        """How a refusal of this broken patch ends (`patch_fix`)."""
        return patch_fix(bool(self.original_files))

    def to_dict(self) -> dict:
        """The `patch.json` object."""
        return {
            "format": PATCH_FORMAT,
            "version": PATCH_VERSION,
            **self.provenance.to_dict(),
            "selection": self.selection.to_dict(),
            "modules": list(self.modules),
            **_alpha_dict(self.alpha),
            "architecture": self.architecture.to_dict(),
            **({"target_config": self.target_config} if self.target_config is not None else {}),
            "files": list(self.files),
            "original_files": list(self.original_files) if self.original_files is not None else None,
            "tensors": [t.to_dict() for t in self.tensors],
            "card": self.card,
            "original": self.original.to_dict() if self.original is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict, file: Path | None = None) -> PatchRecord:
        """Read a `patch.json` object (from `file`, for messages).

        Raises:
            SurgeryError: another format or version, or a field missing or mistyped.
        """
        file_name = file or PATCH_RECORD
        if d.get("format") != PATCH_FORMAT or d.get("version") != PATCH_VERSION:
            raise SurgeryError(
                f"{file_name}: not a {PATCH_FORMAT} version {PATCH_VERSION} record; {PATCH_FIX} with this surgery"
            )
        try:
            original = _field(d, "original", dict, optional=True)
            if d.get("original_files") and original is None:  # a reversible patch's headers, index and card
                raise KeyError("original")
            return cls(
                Provenance.from_dict(d),
                SelectionOptions.from_dict(_field(d, "selection", dict)),
                _strings(d, "modules") or (),
                Architecture.from_dict(_field(d, "architecture", dict)),
                _field(d, "target_config", dict, optional=True),
                _strings(d, "files") or (),
                _strings(d, "original_files", optional=True),
                tuple(PatchedTensor.from_dict(t) for t in _field(d, "tensors", list)),
                _field(d, "card", str),
                Originals.from_dict(original) if original is not None else None,
                _alpha(d),
            )
        except (KeyError, TypeError) as e:
            fix = patch_fix(bool(d.get("original_files")))
            raise SurgeryError(f"{file_name}: malformed record ({e!r} missing or mistyped); {fix}") from None
