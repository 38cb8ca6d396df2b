"""The write plan: every output file of a transplant, an apply or a patch, known before a byte is written.

A `WritePlan` lists each output file with its header, where each of its bytes comes from (the
target, the source, a patch; cast or not; blended with the target's or not), whether it is hard-linked
to the target's file, and how it is written, with the reason. `transplant`, `apply` and `write_patch`
each build one; `write.write_files` runs it; `surgery transplant --dry-run` prints it (`WritePlan.describe`).

The write mode is chosen here and nowhere else (`choose_mode`, and `checkpoint_plan` for links):

- page cache: bytes that keep their dtype move with `copy_file_range` (in the kernel), writeback
  starts behind the writer, and the output stays cached for the command that usually comes next;
- O_DIRECT: aligned blocks straight to the disk, past the page cache;
- hard link: a target shard that no selected tensor touches, shared with the target (`--link`).

What the filesystem refuses at run time is not a choice but a fallback, in `checkpoints/direct_write`:
O_DIRECT refused at open or at a write goes on through the page cache, a `copy_file_range` the kernel
refuses goes through blocks, and a hard link refused (another filesystem) is copied, with a note.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoints.folder import Checkpoint, TensorRef
from surgery.checkpoints.header import DTYPE_SIZES, ShardHeader, TensorInfo, encode_header

PAGE_CACHE = "page cache"
DIRECT = "O_DIRECT"
# "1" writes every output with O_DIRECT (where the filesystem takes it), "0" none; unset, `choose_mode`
# decides by what the output is and its size.
DIRECT_ENV = "SURGERY_DIRECT_IO"
# save_pretrained's default max_shard_size ("5GB"): where a patch's files are split.
MAX_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class Blend:
    """How a source tensor is blended with the target's (`transplant --alpha`): written as
    `target + alpha * (source - target)`, in float32 rounded to the target's dtype (`streaming.blend`).

    Attributes:
        alpha: the source's weight, 0 < alpha < 1 (at 1 there is no blend: the source's bytes are copied).
        target: where the target's bytes of the same tensor lie (in the output's dtype and shape).
    """

    alpha: float
    target: TensorRef


def blends(alpha: float, target: Checkpoint, names: Iterable[str]) -> dict[str, Blend]:
    """The blend of each named tensor with `target`'s at `alpha`; none at alpha 1, so that a plain transplant
    plans (and writes) exactly what it did before blends existed."""
    return {} if alpha == 1 else {n: Blend(alpha, target.tensors[n]) for n in names}


@dataclass(frozen=True)
class Piece:
    """A run of output bytes taken from one input file at one offset (absolute offsets).

    `tensor` names a tensor taken from the source (or a patch): those are hashed on the way (and cast
    if needed, or with `blend` computed with the target's); target runs are copied as they are.
    """

    src_path: Path
    src_off: int
    src_nbytes: int
    dst_off: int
    nbytes: int
    src_dtype: str
    dst_dtype: str
    tensor: str | None = None
    blend: Blend | None = None

    @property
    def cast(self) -> bool:
        return self.src_dtype != self.dst_dtype

    @property
    def alpha(self) -> float:
        """The source's weight in these bytes: 1 where they are the source's as they are (or cast)."""
        return 1.0 if self.blend is None else self.blend.alpha


@dataclass(frozen=True)
class WriteMode:
    """How a file's bytes go to the disk (`PAGE_CACHE` or `DIRECT`), and why."""

    name: str
    why: str

    @property
    def direct(self) -> bool:
        return self.name == DIRECT


@dataclass(frozen=True)
class FilePlan:
    """One output file.

    Attributes:
        name: its file name in the output folder.
        header: its safetensors header, length prefix included.
        pieces: where its bytes come from, in file order.
        link_from: the target's file it is hard-linked to instead of written, if any (written in the
            plan's mode where the filesystem refuses the link).
        role: what the file is: `checkpoint` (a shard), `patch` or `original` (a patch's files).
    """

    name: str
    header: bytes
    pieces: tuple[Piece, ...]
    link_from: Path | None = None
    role: str = "checkpoint"

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(p.nbytes for p in self.pieces)

    @property
    def hashed(self) -> tuple[Piece, ...]:
        """The pieces that are tensors taken from the source or a patch (hashed as they are written)."""
        return tuple(p for p in self.pieces if p.tensor is not None)


@dataclass(frozen=True)
class WritePlan:
    """Every output file, in the order they are written, and the mode of those that are written (with why)."""

    files: tuple[FilePlan, ...]
    mode: WriteMode

    @property
    def nbytes(self) -> int:
        """The bytes of every file, linked ones included (the free space a run asks for)."""
        return sum(f.nbytes for f in self.files)

    def only(self, role: str) -> WritePlan:
        """The files of one role (a patch writes its `patch` and `original` files side by side)."""
        return WritePlan(tuple(f for f in self.files if f.role == role), self.mode)

    def describe(self) -> str:
        """What `transplant --dry-run` prints: per file, its mode and why, what its tensors are and its bytes."""
        lines = []
        for f in self.files:
            if f.link_from is not None:
                how = f"hard link to {f.link_from} (--link, and it holds no selected tensor; else {self.mode.name})"
            else:
                how = f"{self.mode.name} ({self.mode.why})"
            lines.append(f"{f.name} ({f.role}): {f.nbytes} bytes, {how}")
            if f.hashed:
                kind = "the target" if f.role == "original" else "the source"
                lines.append(f"  {_tensors(f.hashed)} from {kind}: " + ", ".join(p.tensor or "" for p in f.hashed))
            copied = sum(p.nbytes for p in f.pieces if p.tensor is None)
            if copied:
                lines.append(f"  {copied} bytes from the target")
        taken = [p for f in self.files if f.role != "original" for p in f.hashed]
        linked = sum(1 for f in self.files if f.link_from)
        lines.append(
            f"{len(self.files)} files, {self.nbytes} bytes: {_tensors(taken)} from the source"
            + (f", {linked} files hard-linked" if linked else "")
            + "; nothing written (--dry-run)"
        )
        return "\n".join(lines)


def _tensors(pieces: Sequence[Piece]) -> str:
    """`N tensors (B bytes, C cast[, D blended with the target at alpha A])`: what `describe` says of tensors
    taken from an input."""
    cast = sum(p.cast for p in pieces)
    blended = [p.alpha for p in pieces if p.blend is not None]
    at = ", ".join(f"{a!r}" for a in sorted(set(blended)))
    mixed = f", {len(blended)} blended with the target at alpha {at}" if blended else ""
    many = "s" if len(pieces) != 1 else ""
    return f"{len(pieces)} tensor{many} ({sum(p.nbytes for p in pieces)} bytes, {cast} cast{mixed})"


def choose_mode(nbytes: int, *, read_next: bool) -> WriteMode:
    """How to write an output of `nbytes`: the one place the write mode is chosen.

    As `SURGERY_DIRECT_IO` says, if set to 1 or 0. Otherwise, an output that is `read_next` (a
    checkpoint, read whole by the command that usually comes next: `verify`, `eval`, `push`, a load)
    goes through the page cache if it fits in half the memory available, and stays there for that
    command: on our test VM, reading a fresh 3.93 GiB O_DIRECT output took 7.8-8.0 s, and the same from
    the page cache 0.2-0.5 s (there, free page reporting hands long-free memory back to the host, so the
    reader of an O_DIRECT output pays a host fault per page that a page-cache writer paid while writing:
    bench/fresh_pages_bench.py). Written with O_DIRECT the same output took 0.72x the time, but write plus
    that first read 1.28x `cp -r && sync` against 1.08x (bench/direct_write_bench.py, 3 rounds). One
    that does not fit could not stay there anyway, and would only evict
    everything else on its way through. An output that is not `read_next` (a patch: kept, pushed,
    or applied once, and never loaded whole) is written with O_DIRECT whatever its size: writing is
    what its user waits for: O_DIRECT wrote a 745 MiB patch in 0.83 s against 2.40 s through the
    page cache (medians of 5 rounds of bench/transplant_bench.py), at the cost of the one later read
    (`apply` of it took 8.21 s, of the other 6.71 s).

    Args:
        nbytes: the bytes the output writes (linked files left out).
        read_next: whether the output is a checkpoint that the next command reads whole.

    Returns:
        The mode, with its reason.
    """
    forced = os.environ.get(DIRECT_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return WriteMode(DIRECT, f"{DIRECT_ENV}={forced}")
    if forced in ("0", "false", "no", "off"):
        return WriteMode(PAGE_CACHE, f"{DIRECT_ENV}={forced}")
    if not read_next:
        return WriteMode(DIRECT, "a patch is written once and not loaded whole: writing fastest is what counts")
    available = _mem_available()
    if available is not None and nbytes > available // 2:
        return WriteMode(DIRECT, f"{nbytes} bytes is over half the {available} bytes of memory available")
    known = "unknown" if available is None else f"{available} bytes"
    return WriteMode(
        PAGE_CACHE, f"{nbytes} bytes fits in half the memory available ({known}): it stays cached for the next command"
    )


def _mem_available() -> int | None:
    """Bytes of memory available without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def checkpoint_plan(
    tgt: Checkpoint,
    replacements: Mapping[str, TensorRef],
    shard_header: Callable[[ShardHeader], bytes],
    *,
    link: bool = False,
    link_same_header: bool = False,
    blended: Mapping[str, Blend] | None = None,
) -> WritePlan:
    """The plan of `tgt` with the `replacements` tensors' bytes (cast to the target's dtypes, and blended with
    the target's where `blended` says, `blends`) in their place.

    Every shard keeps the target's name and tensor offsets, with the header `shard_header` makes. With
    `link`, a shard that holds no replaced tensor and whose header already says `format: pt`
    (transformers needs it; other shards are rewritten with it) is hard-linked to the target's file: it
    keeps the target's header, without `surgery.provenance` (that is in transplant.json). With
    `link_same_header` too, only a shard whose header is already the planned one is linked.
    """
    shards = []
    for shard in tgt.shards:
        header = shard_header(shard)
        pieces = [
            _piece(replacements.get(info.name), (blended or {}).get(info.name), shard, info, len(header))
            for info in shard.tensors
        ]
        linked = (
            link
            and all(p.tensor is None for p in pieces)
            and shard.metadata.get("format") == "pt"
            and (not link_same_header or _has_header(shard.path, header))
        )
        shards.append((header, tuple(_coalesce(pieces)), shard.path if linked else None))
    written = sum(len(h) + sum(p.nbytes for p in pieces) for h, pieces, linked in shards if linked is None)
    files = (
        FilePlan(shard.path.name, header, pieces, linked)
        for (header, pieces, linked), shard in zip(shards, tgt.shards, strict=True)
    )
    return WritePlan(tuple(files), choose_mode(written, read_next=True))


def packed_plan(
    stem: str,
    tensors: Sequence[tuple[TensorInfo, TensorRef]],
    mode: WriteMode,
    blended: Mapping[str, Blend] | None = None,
) -> WritePlan:
    """The plan of files holding `tensors` (each as its `TensorInfo` says, from where its ref lies, blended
    with the target's where `blended` says), named `{stem}.safetensors`, split past MAX_SHARD_BYTES as
    save_pretrained does.

    Within a file, tensors are laid out by element size, largest first, then by name, as safetensors
    does, so every tensor stays aligned to its element size.
    """
    order = sorted(tensors, key=lambda t: (-DTYPE_SIZES[t[0].dtype], t[0].name))
    groups: list[list[tuple[TensorInfo, TensorRef]]] = [[]]
    size = 0
    for t in order:
        if groups[-1] and size + t[0].nbytes > MAX_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t[0].nbytes
    files = []
    for i, group in enumerate(groups, 1):
        name = f"{stem}.safetensors" if len(groups) == 1 else f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        entries, begin = [], 0
        for info, _ in group:
            entries.append(TensorInfo(info.name, info.dtype, info.shape, begin, begin + info.nbytes))
            begin += info.nbytes
        header = encode_header(entries, {"format": "pt"})
        pieces = tuple(
            _taken(s, e, len(header) + e.begin, (blended or {}).get(e.name))
            for e, (_, s) in zip(entries, group, strict=True)
        )
        files.append(FilePlan(name, header, pieces, role=stem))
    return WritePlan(tuple(files), mode)


def _piece(
    taken: TensorRef | None, blend: Blend | None, shard: ShardHeader, info: TensorInfo, header_len: int
) -> Piece:
    """The output bytes of tensor `info` of `shard`: `taken`'s (hashed, cast if needed, blended with `blend`),
    else the target's."""
    dst_off = header_len + info.begin
    if taken is not None:
        return _taken(taken, info, dst_off, blend)
    ref = TensorRef(shard, info)
    return Piece(ref.path, ref.offset, ref.nbytes, dst_off, info.nbytes, info.dtype, info.dtype)


def _taken(taken: TensorRef, info: TensorInfo, dst_off: int, blend: Blend | None) -> Piece:
    """The output bytes at `dst_off` of tensor `info` taken from `taken` (hashed, cast if needed, blended with
    `blend`)."""
    return Piece(
        taken.path, taken.offset, taken.nbytes, dst_off, info.nbytes, taken.dtype, info.dtype, info.name, blend
    )


def _coalesce(pieces: list[Piece]) -> list[Piece]:
    """Merge neighbouring target pieces that are contiguous in the same input file."""
    merged: list[Piece] = []
    for p in pieces:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.tensor is None
            and p.tensor is None
            and last.src_path == p.src_path
            and last.src_off + last.nbytes == p.src_off
            and last.dst_off + last.nbytes == p.dst_off
        ):
            n = last.nbytes + p.nbytes
            merged[-1] = Piece(last.src_path, last.src_off, n, last.dst_off, n, p.src_dtype, p.dst_dtype)
        else:
            merged.append(p)
    return merged


def _has_header(path: Path, header: bytes) -> bool:
    """Whether the file starts with `header` (its length prefix makes a prefix match exact)."""
    with open(path, "rb") as f:
        return f.read(len(header)) == header
