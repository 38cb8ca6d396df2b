"""Patches: a folder with only the selected modules' tensors, applied to the target later.

`transplant --patch` writes, atomically and streaming, as `transplant` does:
- `patch.safetensors` (sharded as `patch-0000i-of-0000N.safetensors` past 5 GB, as `save_pretrained`
  does): the selected tensors, cast to the target's dtypes: the exact bytes `transplant` would write;
- with `--reversible`, `original.safetensors`: the target's own bytes of those tensors, and the
  target's shard headers, index and model card, so that `apply --revert` restores it byte for byte;
- `patch.json`: the target, source and manifest provenance, the target's config (to name what differs
  in a target that is not the one recorded), the selection, and per tensor the sha256 of the target's
  bytes and of the patch's bytes;
- `README.md`: a model card whose `base_model` is the target, saying how to apply the patch.

`open_patch` reads a patch folder back and refuses one that is incomplete or tampered with. The
originals are needed only to revert: a forward apply takes a patch whose originals are missing or
damaged (`apply` warns), `apply --revert` refuses it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoints.digests import tensor_digests
from surgery.checkpoints.files import CARD_FILE, INDEX_FILE
from surgery.checkpoints.folder import Checkpoint
from surgery.checkpoints.header import DTYPE_SIZES, TensorInfo, encode_header, read_header
from surgery.checkpoints.staging import staged_folder
from surgery.checkpoints.streaming import ReadOnlyFiles, sha256_range
from surgery.errors import SurgeryError
from surgery.fileio import read_json_object
from surgery.transplants.write import Piece, ShardPlan, Stored, select, stored, write_shards

PATCH_RECORD = "patch.json"
PATCH_FORMAT = "surgery-patch"
PATCH_VERSION = 1
# save_pretrained's default max_shard_size ("5GB").
MAX_SHARD_BYTES = 5 * 10**9
# The command that writes a patch, and how a refusal of a broken patch folder ends (`fix` adds --reversible).
_WRITE = "surgery transplant --patch"
_FIX = f"rewrite it with `{_WRITE}`"


@dataclass(frozen=True)
class PatchTensor:
    """One tensor of a patch: its name, dtype and shape (the target's), where its bytes lie, and two digests."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Stored
    sha256: str
    target_sha256: str
    original: Stored | None


@dataclass(frozen=True)
class Patch:
    """A validated patch folder.

    Attributes:
        path: the folder, resolved.
        record: the parsed `patch.json`.
        tensors: name -> the tensor, in name order.
    """

    path: Path
    record: dict
    tensors: dict[str, PatchTensor]
    originals_problem: str | None = None

    @property
    def reversible(self) -> bool:
        """Whether `apply --revert` can use it: its original tensors are all there."""
        return all(t.original is not None for t in self.tensors.values())

    @property
    def modules(self) -> list[str]:
        return list(self.record["modules"])

    def summary(self) -> dict:
        """What `surgery inspect` prints of a patch: what it is for, what it holds, whether it reverts."""
        target, source = self.record["target"], self.record["source"]
        return {
            "path": str(self.path),
            "kind": "patch (surgery transplant --patch); apply it with surgery apply",
            "target": _named(target),
            "target_fingerprint": target["fingerprint"],
            "source": _named(source),
            "model_type": self.record["architecture"]["model_type"],
            "modules": self.modules,
            "tensors": len(self.tensors),
            "total_bytes": sum(t.data.nbytes for t in self.tensors.values()),
            "reversible": self.reversible,
            **({"originals": self.originals_problem} if self.originals_problem else {}),
        }


def _named(origin: dict) -> str:
    """An input as a record names it: its Hub repo at the commit, else its folder."""
    hub = origin.get("hub")
    return f"{hub['repo_id']}@{hub['commit']}" if isinstance(hub, dict) else str(origin["path"])


def is_patch(folder: str | Path) -> bool:
    """Whether `folder` is a patch folder (it holds a patch record), not a checkpoint."""
    return Path(folder).is_dir() and (Path(folder) / PATCH_RECORD).is_file()


def fix(record: dict) -> str:
    """How a refusal of a broken patch ends: the command that writes it again, `--reversible` included."""
    return f"rewrite it with `{_WRITE} --reversible`" if record.get("original_files") else _FIX


@dataclass(frozen=True)
class PatchResult:
    """What `write_patch` wrote: the folder, the modules, the tensors with their sha256, the patch's bytes."""

    out: Path
    modules: tuple[str, ...]
    tensors: dict[str, str]
    bytes_written: int


def write_patch(
    target: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    reversible: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **selection: Any,
) -> PatchResult:
    """Write a patch folder holding only the selected modules' tensors (see the module docstring).

    Args:
        target, source, out, overwrite, progress: as in `transplant`.
        reversible: also store the target's original tensors, shard headers, index and card.
        selection: `transplant`'s selection arguments (`manifest`, `top_k`, `only`, `layers`,
            `modules`, `force`, `trust_remote_code`), with the same refusals.

    Raises:
        SurgeryError: any input is invalid; nothing is written in that case.
    """
    out = Path(out)
    sel = select(target, source, out=out, overwrite=overwrite, **selection)
    out = out.resolve()
    tgt, src = sel.target, sel.source
    infos = {n: tgt.tensors[n].info for n in sel.tensors}

    def cards() -> tuple[str, str]:
        """The card of the checkpoint the patch makes (kept in the record) and the patch's own card."""
        from surgery.transplants.card import patch_card  # huggingface_hub's card classes: ~0.25 s to import

        card = patch_card(
            out.name, tgt, src, sel.modules, manifest=sel.manifest, selection=sel.selection, reversible=reversible
        )
        return sel.card(out.name).content, card.content

    patch_plans = _pack("patch", [(infos[n], stored(src.tensors[n])) for n in sel.tensors])
    original_plans = _pack("original", [(infos[n], stored(tgt.tensors[n])) for n in sel.tensors]) if reversible else []
    plans = patch_plans + original_plans
    with staged_folder(out, overwrite, sum(len(p.header) + sum(x.nbytes for x in p.pieces) for p in plans)) as tmp:
        # The target's side (its digests, or its original tensors) is read, and the cards are made, on
        # other threads while the patch is written: copying, hashing and pread release the GIL.
        with ThreadPoolExecutor(2, thread_name_prefix="surgery-patch") as pool:
            target_side = (
                pool.submit(write_shards, tmp, original_plans, False, read_next=False)
                if reversible
                else pool.submit(tensor_digests, tgt, sel.tensors)
            )
            made = pool.submit(cards)
            hashes = write_shards(tmp, patch_plans, progress, read_next=False)
            originals = target_side.result()
            applied_card, card = made.result()
        record = {
            "format": PATCH_FORMAT,
            "version": PATCH_VERSION,
            **sel.provenance,
            "selection": sel.selection,
            "modules": [c.name for c in sel.modules],
            "architecture": architecture(tgt.config),
            "target_config": tgt.config,
            "files": [p.name for p in patch_plans],
            "original_files": [p.name for p in original_plans] if reversible else None,
            "tensors": [
                {
                    "name": n,
                    "dtype": infos[n].dtype,
                    "shape": list(infos[n].shape),
                    "source_dtype": src.tensors[n].info.dtype,
                    "sha256": hashes[n],
                    "target_sha256": originals[n],
                }
                for n in sel.tensors
            ],
            "card": applied_card,
            "original": _originals(tgt) if reversible else None,
        }
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        with open(tmp / PATCH_RECORD, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return PatchResult(out, tuple(c.name for c in sel.modules), hashes, sum(i.nbytes for i in infos.values()))


def architecture(config: dict) -> dict:
    """What a patch records of its target's config to refuse another architecture by name."""
    return {"model_type": config.get("model_type"), "architectures": config.get("architectures")}


def _pack(stem: str, tensors: list[tuple[TensorInfo, Stored]]) -> list[ShardPlan]:
    """Plans for files holding `tensors` (each in its target dtype), split past MAX_SHARD_BYTES.

    Within a file, tensors are laid out by element size, largest first, then by name, as safetensors
    does, so every tensor stays aligned to its element size.
    """
    order = sorted(tensors, key=lambda t: (-DTYPE_SIZES[t[0].dtype], t[0].name))
    groups: list[list[tuple[TensorInfo, Stored]]] = [[]]
    size = 0
    for t in order:
        if groups[-1] and size + t[0].nbytes > MAX_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t[0].nbytes
    plans = []
    for i, group in enumerate(groups, 1):
        name = f"{stem}.safetensors" if len(groups) == 1 else f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        entries, begin = [], 0
        for info, _ in group:
            entries.append(TensorInfo(info.name, info.dtype, info.shape, begin, begin + info.nbytes))
            begin += info.nbytes
        header = encode_header(entries, {"format": "pt"})
        pieces = tuple(
            Piece(s.path, s.offset, s.nbytes, len(header) + e.begin, e.nbytes, s.dtype, e.dtype, tensor=e.name)
            for e, (_, s) in zip(entries, group, strict=True)
        )
        plans.append(ShardPlan(name, header, pieces))
    return plans


def sha256_of(files: ReadOnlyFiles, where: Stored) -> str:
    """sha256 of the bytes at `where`."""
    return sha256_range(files.fd(where.path), where.offset, where.nbytes)


def _originals(tgt: Checkpoint) -> dict:
    """What `apply --revert` needs besides the tensors to give the target back byte for byte."""
    headers = {}
    for shard in tgt.shards:
        with open(shard.path, "rb") as f:
            f.seek(8)
            headers[shard.path.name] = f.read(shard.data_start - 8).decode("utf-8")
    index = tgt.path / INDEX_FILE
    card = tgt.path / CARD_FILE
    return {
        "shard_headers": headers,
        "index": index.read_text(encoding="utf-8") if tgt.index is not None else None,
        "card": card.read_text(encoding="utf-8") if card.is_file() else None,
    }


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
    record = read_json_object(path / PATCH_RECORD, "patch record", _FIX)
    if record.get("format") != PATCH_FORMAT or record.get("version") != PATCH_VERSION:
        raise SurgeryError(
            f"{path / PATCH_RECORD}: not a {PATCH_FORMAT} version {PATCH_VERSION} record; {_FIX} with this surgery"
        )
    problem = None
    try:
        listed = {t["name"]: (t["dtype"], tuple(t["shape"])) for t in record["tensors"]}
        where = _held(path, record, "patch", listed)
        try:
            found = _held(path, record, "original", listed) if record.get("original_files") else {}
        except SurgeryError as e:
            if originals:
                raise
            found, problem = {}, str(e)
        tensors = {
            t["name"]: PatchTensor(
                t["name"], *listed[t["name"]], where[t["name"]], t["sha256"], t["target_sha256"], found.get(t["name"])
            )
            for t in record["tensors"]
        }
        _ = record["modules"], record["target"]["fingerprint"], record["card"], record["selection"]
        _ = record["architecture"]["model_type"], record["architecture"]["architectures"]
    except (KeyError, TypeError, AttributeError) as e:
        raise SurgeryError(
            f"{path / PATCH_RECORD}: malformed record ({e!r} missing or mistyped); {fix(record)}"
        ) from None
    patch = Patch(path, record, tensors, problem)
    if check_digests:
        check_patch_digests(patch, originals=originals)
    return patch


def _held(folder: Path, record: dict, kind: str, listed: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, Stored]:
    """Where each listed tensor lies in the patch's (`kind` "patch") or original files, checked against the record."""
    found = _locate(folder, record["files" if kind == "patch" else "original_files"], fix(record))
    for name, (dtype, shape) in listed.items():
        if name not in found:
            raise SurgeryError(f"{folder}: tensor {name} is in {PATCH_RECORD} but in no {kind} file; {fix(record)}")
        if (found[name][1].dtype, found[name][1].shape) != (dtype, shape):
            raise SurgeryError(f"{folder}: {kind} tensor {name} is not {dtype} {list(shape)}; {fix(record)}")
    if set(found) != set(listed):
        raise SurgeryError(f"{folder}: the {kind} files hold tensors {PATCH_RECORD} does not list; {fix(record)}")
    return {name: at for name, (at, _) in found.items()}


def check_patch_digests(patch: Patch, *, tensors: bool = True, originals: bool = True) -> None:
    """Refuse a patch whose tensors (if `tensors`) or originals (if `originals`, where it has them) differ
    from the sha256 its record gives them.

    Raises:
        SurgeryError: naming the first tensor that differs.
    """
    with ReadOnlyFiles() as files:
        for t in patch.tensors.values():
            checks: list[tuple[str, Stored, str]] = []
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
        f"corrupt; {fix(patch.record)}"
    )


def _locate(folder: Path, names: list[str], fix_text: str) -> dict[str, tuple[Stored, TensorInfo]]:
    """Every tensor of the named files in `folder`: where its bytes lie and its header entry."""
    out = {}
    for name in names:
        file = folder / name
        if Path(name).name != name or not file.is_file():
            raise SurgeryError(f"{folder}: {name} is missing; the patch is incomplete; {fix_text}")
        header = read_header(file)
        for info in header.tensors:
            out[info.name] = (Stored(file, header.data_start + info.begin, info.nbytes, info.dtype), info)
    return out
