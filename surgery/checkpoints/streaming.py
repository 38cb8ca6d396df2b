"""Bounded-memory byte movement between safetensors files.

Everything here works on file descriptors and offsets, in chunks of at most
`CHUNK_BYTES`, so memory use does not depend on tensor or checkpoint size.
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

    def read(at: int, n: int) -> bytes:
        with open(path, "rb") as f:
            if src == dst:
                f.seek(offset + at)
                return f.read(n)
            s, d = DTYPE_SIZES[src], DTYPE_SIZES[dst]
            first, last = at // d, -(-(at + n) // d)
            f.seek(offset + first * s)
            raw = f.read((last - first) * s)
        import torch

        elements = torch.frombuffer(bytearray(raw), dtype=torch_dtype(src))
        cast = elements.to(torch_dtype(dst)).view(torch.uint8).numpy().tobytes()
        return cast[at - first * d : at - first * d + n]

    return read


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
