"""Write a patched checkpoint: the target's tensors, selected modules from the source; and run a write plan.

The output's tensor names, dtypes, shapes and offsets equal the target's, so every output header is
known before a byte is written (`plan.checkpoint_plan`). `write_files` runs a `WritePlan`, for
`transplant`, `apply` and `write_patch` alike: each output file front to back, in the kernel
(`copy_file_range`) or through a few 8 MiB blocks (with O_DIRECT: `checkpoints/direct_write`), so
peak memory does not grow with the checkpoint; a tensor cast or blended (`--alpha`) is computed a
chunk at a time on the way. The output is built in a temp folder beside OUT,
fsynced and renamed into place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from surgery.checkpoints.digests import cached_digests, tensor_digests
from surgery.checkpoints.direct_write import BlockWriter
from surgery.checkpoints.files import CARD_FILE, INDEX_FILE, RECORD_FILE, copied_files
from surgery.checkpoints.folder import Checkpoint, open_checkpoint
from surgery.checkpoints.header import DTYPE_SIZES
from surgery.checkpoints.staging import TMP_PREFIX, staged_folder
from surgery.checkpoints.streaming import (
    ReadOnlyFiles,
    blend_reader,
    blended_chunks,
    cast_reader,
    check_alpha,
    converted_chunks,
)
from surgery.errors import SurgeryError
from surgery.fileio import read_json_object
from surgery.progress import progress_bar
from surgery.transplants.plan import FilePlan, Piece, WritePlan, blends, checkpoint_plan
from surgery.transplants.records import RECORD_FIX, CopiedTensor, TransplantRecord
from surgery.transplants.selection import Selected, select_transplant
from surgery.transplants.summaries import foreign_summaries, load_eval_summary

# Copies go in steps of this size; after each, the progress bar moves, writeback starts (through the
# page cache) and `write_files`' `poll` runs.
STEP_BYTES = 64 * 2**20


@dataclass(frozen=True)
class TransplantResult:
    """What `transplant` wrote.

    Attributes:
        out: the output folder.
        modules: the transplanted module names, in selection order.
        tensors: tensor name -> sha256 of its bytes in the output, for tensors from the source.
        source_bytes: the output bytes of those tensors.
        total_bytes: the output's tensor bytes in all.
        linked_shards: the shards hard-linked to the target's files (`link`), by name.
        shards: the output's shard count.
        alpha: the source's weight in those tensors (`alpha`; 1: copied).
    """

    out: Path
    modules: tuple[str, ...]
    tensors: dict[str, str]
    source_bytes: int
    total_bytes: int
    linked_shards: tuple[str, ...] = ()
    shards: int = 0
    alpha: float = 1.0

    @classmethod
    def made(
        cls, out: Path, modules: Sequence[str], written: Written, tgt: Checkpoint, alpha: float = 1.0
    ) -> TransplantResult:
        """The result of writing `tgt` with the tensors in `written.hashes` replaced (blended at `alpha`)."""
        source_bytes = sum(tgt.tensors[n].info.nbytes for n in written.hashes)
        return cls(
            out, tuple(modules), written.hashes, source_bytes, tgt.total_bytes, written.linked, len(tgt.shards), alpha
        )


@dataclass(frozen=True)
class Written:
    """What `write_checkpoint` wrote: each replaced tensor's sha256 as written, and the shards it hard-linked."""

    hashes: dict[str, str]
    linked: tuple[str, ...]


def output_fingerprint(tgt: Checkpoint, src: Checkpoint, tensors: Sequence[str], alpha: float = 1.0) -> str:
    """The fingerprint of the checkpoint `transplant` writes with `tensors` from `src` (blended with the
    target's at `alpha`, `swap.swapped`'s in memory), without writing it.

    What an in-memory evaluation of that model (`sweep`) records, so that its summary can go into the
    card of the checkpoint written later.
    """
    check_alpha(alpha)

    def reader(name: str) -> Callable[[int, int], bytes]:
        theirs, ours = src.tensors[name], tgt.tensors[name]
        if alpha == 1:
            return cast_reader(theirs.path, theirs.offset, theirs.dtype, ours.dtype)
        return blend_reader((theirs.path, theirs.offset, theirs.dtype), (ours.path, ours.offset, ours.dtype), alpha)

    return tgt.fingerprint_with({n: reader(n) for n in tensors})


def plan_transplant(sel: Selected, *, link: bool = False) -> WritePlan:
    """The plan of the checkpoint `transplant` writes for a selection (`select_transplant`); nothing is written.

    Args:
        sel: what the transplant takes from the source.
        link: plan hard links for the target's shards that hold no selected tensor.

    Returns:
        Every output file, with the mode it is written in and why; with a blend (`sel.alpha` below 1), the
        selected tensors' pieces say so.
    """
    return checkpoint_plan(
        sel.target,
        {n: sel.source.tensors[n] for n in sel.tensors},
        sel.shard_header,
        link=link,
        blended=blends(sel.alpha, sel.target, sel.tensors),
    )


def transplant(
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
    alpha: float | None = None,
) -> TransplantResult:
    """Write a copy of `target` with the selected modules' tensors taken from `source` (or blended with it).

    Select with a manifest (`manifest` + `top_k`, optionally `only`/`layers`/`modules`
    as filters) or by name alone (`modules` glob patterns over the candidates). The output
    gets a model card (`README.md`, see `surgery.transplants.card.model_card`).

    Args:
        target: the checkpoint folder to patch (never modified), or a Hub repo id `org/name[@revision]`.
        source: the checkpoint folder modules are taken from (never modified), or a Hub repo id.
        out: the output folder; must not exist unless `overwrite`.
        manifest: a module manifest ranking the candidates.
        top_k: transplant the K best-ranked modules left after filtering. None, with a manifest that holds a
            K chosen by `surgery select` and no `modules`, takes that K; it is refused with `only`, `layers` or
            a manifest of other checkpoints (`force`), since select measured the top K of all modules on its pair.
        only: restrict to one kind: `attn`, `mlp` or `other`.
        layers: restrict to an inclusive layer range.
        modules: module names or glob patterns.
        force: accept a manifest whose fingerprints do not match, or eval results of another model (with a
            warning, and a note in the card).
        overwrite: replace an existing `out`, only once the new output is complete.
        progress: show a progress bar of bytes (only when stderr is a terminal).
        trust_remote_code: allow configs that need custom model code.
        eval_results: `summary.json` files written by `surgery eval`, reported in the model card.
        link: hard-link the target's shards that hold no selected tensor instead of copying them (their
            bytes and headers stay the target's; across filesystems they are copied, with a note).
        alpha: the source's weight, 0 < alpha <= 1. 1 copies the selected tensors byte for byte; less writes
            `target + alpha * (source - target)` for each, computed in float32 and rounded to the target's
            dtype (with every module selected, `modules=["*"]`, the WiSE-FT interpolation of the two). None:
            the alpha `surgery select` chose, when the manifest's K is used, else 1.

    Returns:
        What was written.

    Raises:
        SurgeryError: any input is invalid; nothing is written in that case.
    """
    out = Path(out)
    sel = select_transplant(
        target=target,
        source=source,
        manifest=manifest,
        top_k=top_k,
        only=only,
        layers=layers,
        modules=modules,
        force=force,
        trust_remote_code=trust_remote_code,
        out=out,
        overwrite=overwrite,
        alpha=alpha,
    )
    out = out.resolve()
    summaries, notes = output_summaries(sel, eval_results, force)
    record = TransplantRecord(sel.provenance, sel.selection, tuple(c.name for c in sel.modules), alpha=sel.alpha)

    def card() -> str:
        return sel.card(out.name, eval_summaries=summaries, notes=notes).content

    plan = plan_transplant(sel, link=link)
    written = write_checkpoint(
        out, sel.target, plan, record=record, card=card, overwrite=overwrite, link=link, progress=progress
    )
    return TransplantResult.made(out, [c.name for c in sel.modules], written, sel.target, sel.alpha)


def output_summaries(sel: Selected, eval_results: Sequence[str | Path], force: bool) -> tuple[list[dict], list[str]]:
    """The eval summaries for the card of `sel`'s output, and the card's notes on them.

    Raises:
        SurgeryError: a summary that cannot be read, or one of another model than this output (unless `force`:
            then it is kept, with a note).
    """
    summaries = [load_eval_summary(p) for p in eval_results]
    # The output's fingerprint is read only when there are summaries to check against it: for a cast
    # selection it imports torch, which a plain transplant never needs.
    expected = output_fingerprint(sel.target, sel.source, sel.tensors, sel.alpha) if summaries else ""
    return summaries, foreign_summaries(eval_results, summaries, expected, force)


def write_checkpoint(
    out: Path,
    tgt: Checkpoint,
    plan: WritePlan,
    *,
    record: TransplantRecord | None,
    card: str | Callable[[], str] | None,
    overwrite: bool,
    link: bool,
    progress: bool,
    index_text: str | None = None,
    source_dtypes: Mapping[str, str] | None = None,
    poll: Callable[[], None] | None = None,
    check: Callable[[dict[str, str]], None] | None = None,
) -> Written:
    """Write `tgt` as `plan` says (`plan.checkpoint_plan`) into `out`, atomically.

    The target's other files are copied, the index is written (`index_text` as is, else the target's
    index), `card` becomes README.md and `record` (with the copied tensors and their sha256 added)
    becomes transplant.json, where `source_dtypes` (default: the dtypes the plan reads them in) gives each
    tensor's dtype in the source. `card` may be a function that makes the text: it is called on a
    second thread while the shards are written (building a card imports huggingface_hub, ~0.25 s).
    With `link` (the plan's links asked for), the linked shards' tensors' sha256 go into the record as
    `linked_sha256` (hashed beside the write), so that `verify` can tell an edit of the target in
    place, which changes the output too, and one warning says so. `poll`, if given, is called between
    copy steps (a check running beside the write: an error it raises stops it), and `check` with the
    replaced tensors' sha256 as written, before the output is published; either one's error discards
    the output.

    Returns:
        Each replaced tensor's sha256 as written, and the linked shards.
    """
    with (
        staged_folder(out, overwrite, plan.nbytes) as tmp,
        ThreadPoolExecutor(2, thread_name_prefix="surgery-card") as pool,
    ):
        card_text = pool.submit(card) if callable(card) else None
        linked_digests = []
        # Read before linking: a hard link changes the target files' ctime, part of the digest cache's key,
        # so what the cache holds for them is found only now, and is stored again under their new identity.
        to_link = {f.name for f in plan.files if f.link_from is not None}
        before = cached_digests(tgt, [t.name for s in tgt.shards if s.path.name in to_link for t in s.tensors])

        def hash_linked(linked: Sequence[str]) -> None:
            print(
                f"warning: {len(linked)} of {len(plan.files)} shards are hard links to the target's files: editing "
                f"the target in place changes this output too (`surgery verify` finds such an edit)",
                file=sys.stderr,
            )
            if record is not None:
                in_linked = [t.name for s in tgt.shards if s.path.name in linked for t in s.tensors]
                linked_digests.append(pool.submit(tensor_digests, tgt, in_linked, known=before))

        written = write_files(plan, tmp, progress=progress, poll=poll, linked=hash_linked)
        if check is not None:
            check(written.hashes)
        _copy_extra_files(tgt.path, tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card if card_text is None else card_text.result(), encoding="utf-8")
        if index_text is not None:
            (tmp / INDEX_FILE).write_text(index_text, encoding="utf-8")
        elif tgt.index is not None:
            _write_json(tmp / INDEX_FILE, tgt.index)
        if record is not None:
            dtypes = {p.tensor: p.src_dtype for f in plan.files for p in f.hashed}
            tensors = tuple(
                CopiedTensor(name, tgt.tensors[name].info.dtype, (source_dtypes or dtypes)[name], written.hashes[name])
                for name in sorted(written.hashes)
            )
            record = replace(record, tensors=tensors)
            if link:
                linked_sha256 = dict(sorted(linked_digests[0].result().items())) if linked_digests else {}
                record = replace(record, linked_shards=written.linked, linked_sha256=linked_sha256)
            _write_json(tmp / RECORD_FILE, record.to_dict())
    return written


def check_output(folder: Path) -> TransplantRecord:
    """Refuse anything but a complete, published transplant output (e.g. before pushing it).

    Args:
        folder: the folder to check.

    Returns:
        Its `transplant.json` record.

    Raises:
        SurgeryError: not a folder, an unfinished temp folder, no record or a malformed one, or shards that do
            not validate.
    """
    if not folder.is_dir():
        raise SurgeryError(f"{folder}: no such folder; pass the output folder of `surgery transplant`")
    if folder.resolve().name.startswith(TMP_PREFIX):
        raise SurgeryError(f"{folder}: an unfinished transplant (temp folder); pass the published output folder")
    if not (folder / RECORD_FILE).is_file():
        raise SurgeryError(f"{folder}: no {RECORD_FILE}, so not a complete `surgery transplant` output; rerun it")
    record = read_json_object(folder / RECORD_FILE, "transplant record", RECORD_FIX)
    open_checkpoint(folder.resolve())  # every shard present, every header valid
    return TransplantRecord.from_dict(record, (folder / RECORD_FILE).absolute())


def write_files(
    plan: WritePlan,
    tmp: Path,
    *,
    progress: bool,
    poll: Callable[[], None] | None = None,
    linked: Callable[[tuple[str, ...]], None] | None = None,
) -> Written:
    """Run `plan` in the folder `tmp`: the one executor of every write plan.

    Files the plan links are hard-linked first (and `linked` called with their names, if any were); where
    the filesystem refuses a link (another filesystem, typically), those files are written instead, with a
    note. Every other file is written front to back (header, then its pieces in order) by a `BlockWriter`,
    in the plan's mode. A source tensor is hashed on the writer's hashing thread as it is copied, or, when
    cast to another dtype or blended with the target's, here as it is computed. `poll` is called after
    every step of a copy.

    Returns:
        The sha256 of each hashed tensor (`Piece.tensor`) as written, and the linked files.
    """
    done = _link_files(plan, tmp)
    if done and linked is not None:
        linked(done)
    hashes = _write(plan, [f for f in plan.files if f.name not in done], tmp, progress, poll)
    return Written(hashes, done)


def _link_files(plan: WritePlan, tmp: Path) -> tuple[str, ...]:
    """Hard-link into `tmp` the files the plan links; return their names (none where the filesystem refuses)."""
    linked: list[str] = []
    for f in plan.files:
        if f.link_from is None:
            continue
        try:
            os.link(f.link_from, tmp / f.name)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            # Typically EXDEV: the output is on another filesystem than the target.
            print(
                f"note: cannot hard-link the target's shards into {tmp.parent} ({e.strerror}); copying them",
                file=sys.stderr,
            )
            break
        linked.append(f.name)
    return tuple(sorted(linked))


def _write(
    plan: WritePlan, files: list[FilePlan], tmp: Path, progress: bool, poll: Callable[[], None] | None
) -> dict[str, str]:
    """Write `files` of `plan` in its mode; return the sha256 of each hashed tensor as written."""
    total = sum(p.nbytes for f in files for p in f.pieces)
    digests: dict[str, Any] = {}  # read once the writer is done: it hashes on a thread of its own
    bar = progress_bar(total, "transplant", "B", progress, unit_scale=True)
    with ReadOnlyFiles() as inputs, bar, BlockWriter(direct=plan.mode.direct) as writer:
        for f in files:
            dst = writer.create(tmp / f.name)
            try:
                dst.write(f.header)
                for p in f.pieces:
                    src = inputs.fd(p.src_path)
                    digest = None
                    if p.tensor is not None:
                        digest = digests[p.tensor] = hashlib.sha256()
                    computed = _computed(p, inputs)
                    if computed is not None:
                        for chunk in computed:
                            assert digest is not None  # only source tensors are cast or blended
                            digest.update(chunk)
                            dst.write(chunk)
                            bar.update(len(chunk))
                    else:
                        # In steps, so that the bar, writeback and `poll` keep up with the copy.
                        for step in range(0, p.nbytes, STEP_BYTES):
                            n = min(STEP_BYTES, p.nbytes - step)
                            dst.copy(src, p.src_off + step, n, digest)
                            bar.update(n)
                            if poll is not None:
                                poll()
            except BaseException:
                dst.abandon()
                raise
            dst.close()
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _computed(p: Piece, inputs: ReadOnlyFiles) -> Iterator[bytes] | None:
    """A piece's bytes where they are computed here, chunk by chunk: blended with the target's (`p.blend`), or
    cast to the output's dtype; None where they are copied as they are (in the kernel, where it can)."""
    if p.blend is not None:
        ours = p.blend.target
        elements = p.nbytes // DTYPE_SIZES[p.dst_dtype]
        source = (inputs.fd(p.src_path), p.src_off, p.src_dtype)
        return blended_chunks(source, (inputs.fd(ours.path), ours.offset, ours.dtype), elements, p.blend.alpha)
    if p.cast:
        return converted_chunks(inputs.fd(p.src_path), p.src_off, p.src_nbytes, p.src_dtype, p.dst_dtype)
    return None


def _copy_extra_files(src_dir: Path, dst_dir: Path) -> None:
    for rel in copied_files(src_dir):
        (dst_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_dir / rel, dst_dir / rel)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
