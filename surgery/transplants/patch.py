"""Patches: a folder with only the selected modules' tensors, applied to the target later.

`transplant --patch` writes, atomically and streaming, as `transplant` does:
- `patch.safetensors` (sharded as `patch-0000i-of-0000N.safetensors` past 5 GB, as `save_pretrained`
  does): the selected tensors, cast to the target's dtypes (and blended with the target's, `--alpha`):
  the exact bytes `transplant` would write;
- with `--reversible`, `original.safetensors`: the target's own bytes of those tensors, and the
  target's shard headers, index and model card, so that `apply --revert` restores it byte for byte;
- `patch.json`: the target, source and manifest provenance, the target's config (to name what differs
  in a target that is not the one recorded), the selection, the blend's alpha (if any), and per tensor
  the sha256 of the target's bytes and of the patch's bytes;
- `README.md`: a model card whose `base_model` is the target, saying how to apply the patch.

`open_patch` reads a patch folder back and refuses one that is incomplete or tampered with. The
originals are needed only to revert: a forward apply takes a patch whose originals are missing or
damaged (`apply` warns), `apply --revert` refuses it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoints.digests import tensor_digests
from surgery.checkpoints.files import CARD_FILE, INDEX_FILE
from surgery.checkpoints.folder import Checkpoint, TensorRef
from surgery.checkpoints.header import read_header
from surgery.checkpoints.staging import staged_folder
from surgery.checkpoints.streaming import ReadOnlyFiles, sha256_range
from surgery.errors import SurgeryError
from surgery.fileio import read_json_object
from surgery.transplants.plan import WritePlan, blends, choose_mode, packed_plan
from surgery.transplants.records import (
    PATCH_FIX,
    PATCH_RECORD,
    Architecture,
    Originals,
    PatchedTensor,
    PatchRecord,
)
from surgery.transplants.selection import Selected, select_transplant
from surgery.transplants.write import write_files


@dataclass(frozen=True)
class PatchTensor:
    """One tensor of a patch: its name, dtype and shape (the target's), where its bytes lie, and two digests."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: TensorRef
    sha256: str
    target_sha256: str
    original: TensorRef | None


@dataclass(frozen=True)
class Patch:
    """A validated patch folder.

    Attributes:
        path: the folder, resolved.
        record: the parsed `patch.json`.
        tensors: name -> the tensor, in name order.
    """

    path: Path
    record: PatchRecord
    tensors: dict[str, PatchTensor]
    originals_problem: str | None = None

    @property
    def reversible(self) -> bool:
        """Whether `apply --revert` can use it: its original tensors are all there."""
        return all(t.original is not None for t in self.tensors.values())

    @property
    def modules(self) -> list[str]:
        return list(self.record.modules)

    def summary(self) -> dict:
        """What `surgery inspect` prints of a patch: what it is for, what it holds, whether it reverts."""
        target, source = self.record.provenance.target, self.record.provenance.source
        return {
            "path": str(self.path),
            "kind": "patch (surgery transplant --patch); apply it with surgery apply",
            "target": target.named,
            "target_fingerprint": target.fingerprint,
            "source": source.named,
            "model_type": self.record.architecture.model_type,
            "modules": self.modules,
            "tensors": len(self.tensors),
            "total_bytes": sum(t.data.nbytes for t in self.tensors.values()),
            "reversible": self.reversible,
            **({"originals": self.originals_problem} if self.originals_problem else {}),
        }


def is_patch(folder: str | Path) -> bool:
    """Whether `folder` is a patch folder (it holds a patch record), not a checkpoint."""
    return Path(folder).is_dir() and (Path(folder) / PATCH_RECORD).is_file()


@dataclass(frozen=True)
class PatchResult:
    """What `write_patch` wrote: the folder, the modules, the tensors with their sha256, the patch's bytes, and
    the source's weight in them (`alpha`; 1: copied)."""

    out: Path
    modules: tuple[str, ...]
    tensors: dict[str, str]
    bytes_written: int
    alpha: float = 1.0


def write_patch(
    *,
    target: str | Path,
    source: str | Path,
    out: str | Path,
    reversible: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    manifest: str | Path | None = None,
    top_k: int | None = None,
    only: str | None = None,
    layers: tuple[int, int] | None = None,
    modules: Sequence[str] = (),
    force: bool = False,
    trust_remote_code: bool = False,
    alpha: float | None = None,
) -> PatchResult:
    """Write a patch folder holding only the selected modules' tensors (see the module docstring).

    Args:
        target, source, out, overwrite, progress, alpha: as in `transplant` (a blended patch holds the
            blended tensors: `apply` writes them as they are).
        reversible: also store the target's original tensors, shard headers, index and card.
        manifest, top_k, only, layers, modules, force, trust_remote_code: `transplant`'s selection
            arguments, with the same refusals.

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
    tgt, src = sel.target, sel.source
    plan = plan_patch(sel, reversible=reversible)
    infos = {n: tgt.tensors[n].info for n in sel.tensors}

    def cards() -> tuple[str, str]:
        """The card of the checkpoint the patch makes (kept in the record) and the patch's own card."""
        from surgery.transplants.card import patch_card  # huggingface_hub's card classes: ~0.25 s to import

        card = patch_card(
            out.name,
            tgt,
            src,
            sel.modules,
            manifest=sel.manifest,
            selection=sel.selection,
            reversible=reversible,
            alpha=sel.alpha,
        )
        return sel.card(out.name).content, card.content

    patch_plan, original_plan = plan.only("patch"), plan.only("original")
    with staged_folder(out, overwrite, plan.nbytes) as tmp:
        # The target's side (its digests, or its original tensors) is read, and the cards are made, on
        # other threads while the patch is written: copying, hashing and pread release the GIL.
        with ThreadPoolExecutor(2, thread_name_prefix="surgery-patch") as pool:
            target_side = (
                pool.submit(lambda: write_files(original_plan, tmp, progress=False).hashes)
                if reversible
                else pool.submit(tensor_digests, tgt, sel.tensors)
            )
            made = pool.submit(cards)
            hashes = write_files(patch_plan, tmp, progress=progress).hashes
            originals = target_side.result()
            applied_card, card = made.result()
        record = PatchRecord(
            sel.provenance,
            sel.selection,
            tuple(c.name for c in sel.modules),
            Architecture.of(tgt.config),
            tgt.config,
            tuple(f.name for f in patch_plan.files),
            tuple(f.name for f in original_plan.files) if reversible else None,
            tuple(
                PatchedTensor(n, infos[n].dtype, infos[n].shape, src.tensors[n].info.dtype, hashes[n], originals[n])
                for n in sel.tensors
            ),
            applied_card,
            _originals(tgt) if reversible else None,
            sel.alpha,
        )
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        with open(tmp / PATCH_RECORD, "w", encoding="utf-8") as f:
            json.dump(record.to_dict(), f, indent=2)
            f.write("\n")
    modules = tuple(c.name for c in sel.modules)
    return PatchResult(out, modules, hashes, sum(i.nbytes for i in infos.values()), sel.alpha)


def plan_patch(sel: Selected, *, reversible: bool = False) -> WritePlan:
    """The plan of the patch `write_patch` writes for a selection (`select_transplant`); nothing is written.

    The patch's files hold the selected tensors cast to the target's dtypes, and blended with the target's
    at `sel.alpha` below 1 (the bytes `transplant` would write); with `reversible`, the original files
    hold the target's own bytes of them.

    Args:
        sel: what the patch takes from the source.
        reversible: plan the original files too.

    Returns:
        Every output file, with the mode it is written in and why.
    """
    mode = choose_mode(sum(sel.target.tensors[n].nbytes for n in sel.tensors), read_next=False)
    infos = [sel.target.tensors[n].info for n in sel.tensors]
    blended = blends(sel.alpha, sel.target, sel.tensors)
    patch = packed_plan("patch", [(i, sel.source.tensors[i.name]) for i in infos], mode, blended)
    if not reversible:
        return patch
    original = packed_plan("original", [(i, sel.target.tensors[i.name]) for i in infos], mode)
    return WritePlan(patch.files + original.files, mode)


def sha256_of(files: ReadOnlyFiles, where: TensorRef) -> str:
    """sha256 of the bytes at `where`."""
    return sha256_range(files.fd(where.path), where.offset, where.nbytes)


def _originals(tgt: Checkpoint) -> Originals:
    """What `apply --revert` needs besides the tensors to give the target back byte for byte."""
    headers = {}
    for shard in tgt.shards:
        with open(shard.path, "rb") as f:
            f.seek(8)
            headers[shard.path.name] = f.read(shard.data_start - 8).decode("utf-8")
    index = tgt.path / INDEX_FILE
    card = tgt.path / CARD_FILE
    return Originals(
        headers,
        index.read_text(encoding="utf-8") if tgt.index is not None else None,
        card.read_text(encoding="utf-8") if card.is_file() else None,
    )


def open_patch(folder: str | Path, *, check_digests: bool = True, originals: bool = True) -> Patch:
    """Read and check a patch folder: its record, its files, and the sha256 of every tensor it holds.

    With `check_digests=False` the tensors are not hashed: the caller must check their bytes before
    it uses them (`apply` hashes them as it copies them, then calls `check_copied_digests`). With
    `originals=False` a reversible patch's original tensors are not needed: files of theirs that are
    missing or do not hold them leave the patch without originals (`reversible` is False), and
    `originals_problem` says why; their bytes are not hashed.

    Raises:
        SurgeryError: not a patch folder, a file missing, or a tensor that differs from its record.
    """
    path = Path(folder)
    if not path.is_dir():
        raise SurgeryError(f"{folder}: no such folder; pass the output of `surgery transplant --patch`")
    if not (path / PATCH_RECORD).is_file():
        raise SurgeryError(
            f"{folder}: no {PATCH_RECORD}, so not a patch; pass the output of `surgery transplant --patch`"
        )
    path = path.resolve()
    record = PatchRecord.from_dict(
        read_json_object(path / PATCH_RECORD, "patch record", PATCH_FIX), path / PATCH_RECORD
    )
    problem = None
    listed = {t.name: (t.dtype, t.shape) for t in record.tensors}
    where = _held(path, record, "patch", listed)
    try:
        found = _held(path, record, "original", listed) if record.original_files else {}
    except SurgeryError as e:
        if originals:
            raise
        found, problem = {}, str(e)
    tensors = {
        t.name: PatchTensor(t.name, t.dtype, t.shape, where[t.name], t.sha256, t.target_sha256, found.get(t.name))
        for t in record.tensors
    }
    patch = Patch(path, record, tensors, problem)
    if check_digests:
        check_patch_digests(patch, originals=originals)
    return patch


def _held(
    folder: Path, record: PatchRecord, kind: str, listed: dict[str, tuple[str, tuple[int, ...]]]
) -> dict[str, TensorRef]:
    """Where each listed tensor lies in the patch's (`kind` "patch") or original files, checked against the record."""
    found = _locate(folder, (record.files if kind == "patch" else record.original_files) or (), record.fix)
    for name, (dtype, shape) in listed.items():
        if name not in found:
            raise SurgeryError(f"{folder}: tensor {name} is in {PATCH_RECORD} but in no {kind} file; {record.fix}")
        if (found[name].dtype, found[name].info.shape) != (dtype, shape):
            raise SurgeryError(f"{folder}: {kind} tensor {name} is not {dtype} {list(shape)}; {record.fix}")
    if set(found) != set(listed):
        raise SurgeryError(f"{folder}: the {kind} files hold tensors {PATCH_RECORD} does not list; {record.fix}")
    return found


def check_patch_digests(patch: Patch, *, tensors: bool = True, originals: bool = True) -> None:
    """Refuse a patch whose tensors (if `tensors`) or originals (if `originals`, where it has them) differ
    from the sha256 its record gives them.

    Raises:
        SurgeryError: naming the first tensor that differs.
    """
    with ReadOnlyFiles() as files:
        for t in patch.tensors.values():
            checks: list[tuple[str, TensorRef, str]] = []
            if tensors:
                checks.append(("tensor", t.data, t.sha256))
            if originals and t.original is not None:
                checks.append(("original tensor", t.original, t.target_sha256))
            for kind, data, digest in checks:
                if sha256_of(files, data) != digest:
                    raise tampered(patch, kind, t.name)


def check_copied_digests(patch: Patch, written: dict[str, str], *, originals: bool = False) -> None:
    """Refuse the patch's tensors (or, with `originals`, its original tensors) that were copied with
    another sha256 than the record gives them: `written`, as `write_checkpoint` hashed them.

    Raises:
        SurgeryError: naming the first tensor that differs.
    """
    for t in patch.tensors.values():
        if written[t.name] != (t.target_sha256 if originals else t.sha256):
            raise tampered(patch, "original tensor" if originals else "tensor", t.name)


def tampered(patch: Patch, kind: str, name: str) -> SurgeryError:
    """The refusal of a patch whose tensor `name` differs from its recorded sha256."""
    return SurgeryError(
        f"{patch.path}: {kind} {name} differs from its sha256 in {PATCH_RECORD}: the patch was modified or is "
        f"corrupt; {patch.record.fix}"
    )


def _locate(folder: Path, names: tuple[str, ...], fix_text: str) -> dict[str, TensorRef]:
    """Every tensor of the named files in `folder`: where its bytes lie, with its header entry."""
    out = {}
    for name in names:
        file = folder / name
        if Path(name).name != name or not file.is_file():
            raise SurgeryError(f"{folder}: {name} is missing; the patch is incomplete; {fix_text}")
        header = read_header(file)
        for info in header.tensors:
            out[info.name] = TensorRef(header, info)
    return out
