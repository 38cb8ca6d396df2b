"""Bounded-memory byte movement between safetensors files, and the one formula of a blend.

Everything here works on file descriptors and offsets, in chunks of at most
`CHUNK_BYTES`, so memory use does not depend on tensor or checkpoint size.

A blend (`transplant --alpha A`) writes `target + A * (source - target)`, computed in float32 and rounded
to the target's dtype: `blend` is that formula, used by the writer (`blended_chunks`), by `verify`, by
an output's fingerprint (`blend_reader`) and by a swap in memory (`swap.swapped`), so all four agree to
the bit.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.checkpoints.header import DTYPE_SIZES
from surgery.errors import SurgeryError

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 8 * 1024 * 1024

# safetensors dtype -> torch dtype attribute name (torch is imported lazily: `inspect`
# and `verify` of same-dtype checkpoints never need it).
_TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])


class ReadOnlyFiles:
    """Opens each input file once, read-only, and closes them all when the `with` block ends."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def __enter__(self) -> ReadOnlyFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def check_convertible(src: str, dst: str, what: str) -> None:
    """Refuse a dtype conversion we cannot do in chunks with torch."""
    if src == dst:
        return
    if src not in _TORCH_NAMES or dst not in _TORCH_NAMES:
        raise SurgeryError(f"{what}: cannot convert {src} to {dst}; convert the source checkpoint to {dst} first")
    floating = (torch_dtype(src).is_floating_point, torch_dtype(dst).is_floating_point)
    if floating != (True, True):
        raise SurgeryError(
            f"{what}: source dtype {src} differs from target dtype {dst} and only float-to-float casts are done"
        )


def check_alpha(alpha: float, flag: str = "--alpha") -> None:
    """Refuse a blend weight outside (0, 1]: 1 copies the source's tensors, and 0 would be the target itself."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1:
        raise SurgeryError(
            f"{flag} {alpha!r} is out of range; pass 0 < A <= 1 (1 copies the source's tensors, 0.5 is the midpoint)"
        )


def check_blendable(src: str, dst: str, what: str) -> None:
    """Refuse a blend of a tensor that is not floating point in both checkpoints (its dtypes `src`, `dst`)."""
    if not all(d in _TORCH_NAMES and torch_dtype(d).is_floating_point for d in (src, dst)):
        raise SurgeryError(f"{what}: {src} in the source, {dst} in the target: only float tensors blend; drop --alpha")


def blend(target: torch.Tensor, source: torch.Tensor, alpha: float) -> torch.Tensor:
    """`target + alpha * (source - target)` in float32 (a new tensor; round it with `.to(dtype)`).

    Spelled out rather than `torch.lerp`, which computes `source - (1 - alpha) * (source - target)` for
    alpha >= 0.5 and so rounds otherwise; each operation rounds to float32 on the CPU and on a GPU alike.
    """
    import torch

    t = target.float()
    return t + torch.tensor(alpha, dtype=torch.float32) * (source.float() - t)


def read_chunks(fd: int, offset: int, n: int, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Yield `n` bytes from `fd` at `offset`, at most `chunk` bytes at a time."""
    while n > 0:
        data = os.pread(fd, min(n, chunk), offset)
        if not data:
            raise SurgeryError("file ended early while reading; was it modified during the run?")
        yield data
        offset, n = offset + len(data), n - len(data)


def sha256_range(fd: int, offset: int, n: int) -> str:
    """sha256 of `n` bytes of `fd` at `offset`."""
    h = hashlib.sha256()
    hash_range(h, fd, offset, n)
    return h.hexdigest()


def hash_range(digest: Any, fd: int, offset: int, n: int) -> None:
    """Feed `n` bytes of `fd` at `offset` to `digest` (a hashlib object)."""
    for chunk in read_chunks(fd, offset, n):
        digest.update(chunk)


def read_tensor(fd: int, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One whole tensor read with `preadv` into memory of its own, not a memory map.

    The file's pages stay in the page cache but are never mapped into this process, so a pass over
    every tensor of a checkpoint does not grow the process's resident set by the checkpoint's size.
    """
    import torch

    t = torch_dtype(dtype)
    if nbytes == 0:
        return torch.empty(shape, dtype=t)
    buf = bytearray(nbytes)
    view, done = memoryview(buf), 0
    while done < nbytes:
        got = os.preadv(fd, [view[done : done + CHUNK_BYTES]], offset + done)
        if not got:
            raise SurgeryError("file ended early while reading; was it modified during the run?")
        done += got
    return torch.frombuffer(buf, dtype=t).reshape(shape)


def cast_reader(path: Path, offset: int, src: str, dst: str) -> Callable[[int, int], bytes]:
    """Random access to a tensor's bytes as they read once cast: `read(at, n)` gives `n` bytes from byte `at`
    of the tensor stored at `offset` of `path` as dtype `src`, cast to `dst` (what a transplant writes).

    Only the elements covering the range are read and cast, so sampling a few bytes of a large tensor
    (as `Checkpoint.fingerprint_with` does) costs a few small reads.
    """
    if src == dst:

        def read(at: int, n: int) -> bytes:
            with open(path, "rb") as f:
                f.seek(offset + at)
                return f.read(n)

        return read
    return _element_reader(dst, lambda first, last: _elements(path, offset, src, first, last).to(torch_dtype(dst)))


def blend_reader(
    source: tuple[Path, int, str], target: tuple[Path, int, str], alpha: float
) -> Callable[[int, int], bytes]:
    """`cast_reader` of a blended tensor: `read(at, n)` gives bytes of `target + alpha * (source - target)` in the
    target's dtype, where `source` and `target` are each the (file, offset, dtype) of the tensor's bytes."""
    dtype = target[2]
    return _element_reader(
        dtype,
        lambda first, last: blend(_elements(*target, first, last), _elements(*source, first, last), alpha).to(
            torch_dtype(dtype)
        ),
    )


def _element_reader(dtype: str, elements: Callable[[int, int], torch.Tensor]) -> Callable[[int, int], bytes]:
    """`read(at, n)` over a tensor of `dtype` whose elements `first` to `last` (exclusive) `elements` makes."""
    size = DTYPE_SIZES[dtype]

    def read(at: int, n: int) -> bytes:
        import torch

        first, last = at // size, -(-(at + n) // size)
        data = elements(first, last).view(torch.uint8).numpy().tobytes()
        return data[at - first * size : at - first * size + n]

    return read


def _elements(path: Path, offset: int, dtype: str, first: int, last: int) -> torch.Tensor:
    """Elements `first` to `last` (exclusive) of the tensor of `dtype` stored at `offset` of `path`."""
    import torch

    size = DTYPE_SIZES[dtype]
    with open(path, "rb") as f:
        f.seek(offset + first * size)
        raw = f.read((last - first) * size)
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype(dtype))


def write_all(fd: int, offset: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def tensor_chunks(fd: int, offset: int, nbytes: int, dtype: str, elements: int) -> Iterator[torch.Tensor]:
    """Yield a tensor stored as `dtype` as flat torch tensors of at most `elements` elements."""
    import torch

    t = torch_dtype(dtype)
    for data in read_chunks(fd, offset, nbytes, elements * t.itemsize):
        yield torch.frombuffer(bytearray(data), dtype=t)


def converted_chunks(fd: int, offset: int, n: int, src: str, dst: str) -> Iterator[bytes]:
    """Yield a tensor's bytes read as dtype `src` and cast to `dst`, chunk by chunk.

    Chunks are cut on element boundaries, so each cast sees whole elements.
    """
    if src == dst:
        yield from read_chunks(fd, offset, n)
        return
    import torch

    elements = CHUNK_BYTES // torch_dtype(src).itemsize
    for chunk in tensor_chunks(fd, offset, n, src, elements):
        yield chunk.to(torch_dtype(dst)).view(torch.uint8).numpy().tobytes()


def blended_chunks(
    source: tuple[int, int, str], target: tuple[int, int, str], elements: int, alpha: float
) -> Iterator[bytes]:
    """Yield the bytes of `target + alpha * (source - target)` in the target's dtype, chunk by chunk (`blend`).

    `source` and `target` are each the (file descriptor, offset, dtype) of a tensor of `elements`
    elements; both are read in step, a chunk of at most `CHUNK_BYTES` of float32 at a time.
    """
    import torch

    (src_fd, src_off, src), (tgt_fd, tgt_off, dst) = source, target
    per = CHUNK_BYTES // max(4, DTYPE_SIZES[src], DTYPE_SIZES[dst])
    theirs = tensor_chunks(src_fd, src_off, elements * DTYPE_SIZES[src], src, per)
    ours = tensor_chunks(tgt_fd, tgt_off, elements * DTYPE_SIZES[dst], dst, per)
    for s, t in zip(theirs, ours, strict=True):
        yield blend(t, s, alpha).to(torch_dtype(dst)).view(torch.uint8).numpy().tobytes()
