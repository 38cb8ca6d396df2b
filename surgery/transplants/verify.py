"""Re-read a patched checkpoint and check every byte against where it should have come from.

A shard hard-linked to the target (`--link`) is the target's own file: comparing the two cannot find
an edit of the target in place, so its tensors are also checked against the sha256 `transplant.json`
recorded when it was linked. A blended output (`--alpha`) has its tensors from the source computed again
from both inputs, `target + alpha * (source - target)` (`streaming.blend`), and compared with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoints.files import RECORD_FILE, copied_files
from surgery.checkpoints.folder import Checkpoint, TensorRef, open_checkpoint
from surgery.checkpoints.header import DTYPE_SIZES
from surgery.checkpoints.streaming import ReadOnlyFiles, blended_chunks, converted_chunks, read_chunks
from surgery.errors import SurgeryError
from surgery.fileio import read_json_object
from surgery.transplants.patch import is_patch
from surgery.transplants.records import Origin, TransplantRecord


class VerificationError(SurgeryError):
    """The output differs from what the transplant should have written. CLI exit code 1."""


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` checked; `linked_shards` of the output's `shards` are hard links to the target's files, and
    the `from_source` tensors were blended with the target's at `alpha` (1: copied)."""

    tensors_checked: int
    from_source: int
    bytes_checked: int
    files_checked: int
    shards: int
    linked_shards: int
    alpha: float = 1.0


def verify(out: str | Path, *, target: str | Path | None = None, source: str | Path | None = None) -> VerifyReport:
    """Check a transplant output against its target and source, byte by byte.

    Every tensor must have the target's name, dtype and shape; tensors recorded in
    `transplant.json` must equal the source's (cast to the target dtype; for a blend, `target +
    alpha * (source - target)` in float32 rounded to the target's dtype) and their
    recorded sha256; all others must equal the target's, and those in shards hard-linked to
    the target also their sha256 recorded when they were linked. Copied files must be identical.

    Args:
        out: the patched checkpoint folder.
        target: the target checkpoint it was made from; default: the one `transplant.json` records.
        source: the source checkpoint it was made from; default: the one `transplant.json` records.

    Returns:
        Counts of what was checked.

    Raises:
        VerificationError: naming the first mismatch.
        SurgeryError: an input is missing or malformed.
    """
    if is_patch(out):
        raise SurgeryError(
            f"{out} is a patch (`surgery transplant --patch`), not a checkpoint; apply it first: "
            f"surgery apply {out} -t TARGET -o OUT, then verify OUT"
        )
    # What the caller named is checked first; an input left out is then taken from the record.
    patched = open_checkpoint(out)
    given = {what: open_checkpoint(path) for what, path in (("target", target), ("source", source)) if path is not None}
    file = patched.path / RECORD_FILE
    record = TransplantRecord.from_dict(
        read_json_object(file, "transplant record", "pass a folder written by `surgery transplant`"), file
    )
    origins = {"source": record.provenance.source, "target": record.provenance.target}
    tgt, src = (given.get(what) or open_checkpoint(_recorded(origins[what], what)) for what in ("target", "source"))
    for what, ckpt in (("source", src), ("target", tgt)):
        if origins[what].fingerprint != ckpt.fingerprint:
            raise VerificationError(f"{out} was not made from {what} {ckpt.path} (fingerprint differs)")
    expected = {t.name: t.sha256 for t in record.tensors}
    recorded = {**(record.linked_sha256 or {}), **expected}

    if [s.path.name for s in patched.shards] != [s.path.name for s in tgt.shards]:
        raise VerificationError(f"{out}: shard files differ from the target's")
    if patched.index != tgt.index:
        raise VerificationError(f"{out}: the shard index differs from the target's")
    linked = set()
    for shard, origin in zip(patched.shards, tgt.shards, strict=True):
        if shard.metadata.get("format") != "pt":
            raise VerificationError(f"{shard.path}: __metadata__ lacks format=pt, so transformers may refuse it")
        if shard.path.samefile(origin.path):
            linked.add(shard.path.name)
            if any(t.name not in recorded for t in shard.tensors):
                raise VerificationError(
                    f"{shard.path}: a hard link to the target's file, and {RECORD_FILE} records no sha256 of its "
                    "tensors, so an edit of the target in place cannot be found; rerun transplant"
                )

    bytes_checked = 0
    with ReadOnlyFiles() as files:
        for name, ref in patched.tensors.items():
            want = tgt.tensors.get(name)
            if want is None:
                raise VerificationError(f"tensor {name!r}: in the output but not in the target")
            if (ref.info.dtype, ref.info.shape) != (want.info.dtype, want.info.shape):
                raise VerificationError(
                    f"tensor {name!r}: output is {ref.info.dtype} {list(ref.info.shape)}, "
                    f"target is {want.info.dtype} {list(want.info.shape)}"
                )
            want_bytes = _expected(name, ref, name in expected, record.alpha, src, tgt, files)
            digest = _compare(name, ref, want_bytes, files)
            if name in recorded and digest != recorded[name]:
                edited = (
                    f"; {ref.shard.path.name} is a hard link to the target's file, so the target was edited in "
                    "place since the transplant (restore it, or rerun transplant)"
                    if ref.shard.path.name in linked
                    else ""
                )
                raise VerificationError(f"tensor {name!r}: sha256 differs from the one in {RECORD_FILE}{edited}")
            bytes_checked += ref.info.nbytes
        missing = sorted(set(tgt.tensors) - set(patched.tensors))
        if missing:
            raise VerificationError(f"tensor {missing[0]!r}: in the target but missing from the output")

    files = copied_files(tgt.path)
    for rel in files:
        if not (patched.path / rel).is_file() or not _same_file(patched.path / rel, tgt.path / rel):
            raise VerificationError(f"file {rel}: missing from the output or different from the target's")
    return VerifyReport(
        len(patched.tensors), len(expected), bytes_checked, len(files), len(patched.shards), len(linked), record.alpha
    )


def _recorded(origin: Origin, what: str) -> str:
    """The input `transplant.json` records as `what`: its folder, or its Hub repo at the recorded commit."""
    if Path(origin.path).is_dir():
        return origin.path
    if origin.hub is not None:
        return origin.named
    raise SurgeryError(f"the {what} recorded in {RECORD_FILE}, {origin.path}, is gone; pass it with --{what}")


def _expected(
    name: str, ref: TensorRef, taken: bool, alpha: float, src: Checkpoint, tgt: Checkpoint, files: ReadOnlyFiles
) -> tuple[Iterator[bytes], str]:
    """The bytes output tensor `ref` must hold, chunk by chunk, and what they are, for a message: the
    source's (cast) if it was `taken` from it, blended with the target's where `alpha` is below 1; else the
    target's."""
    if not taken or alpha == 1:
        origin, label = (src, "source") if taken else (tgt, "target")
        want = origin.tensors[name]
        chunks = converted_chunks(files.fd(want.path), want.offset, want.nbytes, want.dtype, ref.dtype)
        return chunks, f"the {label} checkpoint {origin.path}"
    theirs, ours = src.tensors[name], tgt.tensors[name]
    source = (files.fd(theirs.path), theirs.offset, theirs.dtype)
    target = (files.fd(ours.path), ours.offset, ours.dtype)
    chunks = blended_chunks(source, target, ref.nbytes // DTYPE_SIZES[ref.dtype], alpha)
    return chunks, f"target + {alpha!r} * (source - target) of the target {tgt.path} and the source {src.path}"


def _compare(name: str, ref: TensorRef, expected: tuple[Iterator[bytes], str], files: ReadOnlyFiles) -> str:
    """Stream the output tensor beside its `expected` bytes (and what they are, for a message); return the
    output's sha256."""
    exp_chunks, label = expected
    got_chunks = read_chunks(files.fd(ref.shard.path), ref.offset, ref.nbytes)
    h = hashlib.sha256()
    pending = b""
    pos = 0
    for exp in exp_chunks:
        while len(pending) < len(exp):
            pending += next(got_chunks)
        got, pending = pending[: len(exp)], pending[len(exp) :]
        if got != exp:
            at = pos + next(i for i, (a, b) in enumerate(zip(got, exp, strict=True)) if a != b)
            raise VerificationError(
                f"tensor {name!r}: byte {at} differs from {label}; the output is corrupt, rerun transplant"
            )
        h.update(got)
        pos += len(got)
    return h.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
