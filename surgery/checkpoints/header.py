"""Strict parsing of one safetensors file header.

We parse headers ourselves instead of trusting `safetensors.safe_open`, because the
streaming merger computes every output byte offset from them: a header that lies about
its offsets must be refused before anything is copied.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data region.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError

# safetensors itself refuses headers over 100 MB; real headers are a few hundred KB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_U64 = 2**64

# Bytes per element of every dtype the safetensors format defines with a whole-byte size.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header.

    `begin`/`end` are offsets relative to the start of the data region.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    """A validated safetensors header: tensors sorted by offset, and where data starts."""

    path: Path
    data_start: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]


def read_header(path: Path) -> ShardHeader:
    """Read and strictly validate the header of the safetensors file at `path`.

    Args:
        path: a `.safetensors` file.

    Returns:
        The validated header.

    Raises:
        SurgeryError: the file is truncated, the header is malformed, or the offsets,
            dtypes or shapes are inconsistent.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SurgeryError(f"{path}: file is {size} bytes, too short to be safetensors; re-download it")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise SurgeryError(
                    f"{path}: header claims {n} bytes, over the {MAX_HEADER_BYTES} byte limit; the file is corrupt"
                )
            if 8 + n > size:
                raise SurgeryError(
                    f"{path}: header length {n} runs past the end of the {size}-byte file; "
                    "the file is truncated or corrupt, re-download it"
                )
            raw = f.read(n)
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    return parse_header(path, raw, size)


def parse_header(path: Path, raw: bytes, file_size: int) -> ShardHeader:
    """Validate header bytes `raw` of a file of `file_size` bytes (see `read_header`)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise SurgeryError(f"{path}: header JSON is nested too deeply; the file is corrupt, re-download it") from None
    except ValueError as e:  # also a bad UTF-8 byte, or an integer of thousands of digits
        raise SurgeryError(f"{path}: header is not valid JSON ({e}); the file is corrupt, re-download it") from None
    if not isinstance(obj, dict):
        raise SurgeryError(f"{path}: header is not a JSON object; the file is corrupt, re-download it")

    metadata = obj.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(_is_text(k) and _is_text(v) for k, v in metadata.items()):
        raise SurgeryError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")

    tensors = [_parse_entry(path, name, entry) for name, entry in obj.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))

    # The data region must be tiled exactly: no gaps, no overlaps, nothing past the end.
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    cursor = 0
    for t in tensors:
        if t.begin != cursor:
            what = "overlaps the previous tensor" if t.begin < cursor else f"leaves a gap after offset {cursor}"
            raise SurgeryError(f"{path}: tensor {brief(t.name)} at offset {t.begin} {what}; the file is corrupt")
        cursor = t.end
    if cursor != data_len:
        raise SurgeryError(
            f"{path}: tensors end at data offset {cursor} but the data region is {data_len} bytes; "
            "the file is truncated or corrupt, re-download it"
        )
    return ShardHeader(path=path, data_start=data_start, tensors=tuple(tensors), metadata=dict(metadata))


def _parse_entry(path: Path, name: str, entry: object) -> TensorInfo:
    if not _is_text(name):
        raise SurgeryError(f"{path}: tensor name {brief(name)} is not valid Unicode; the file is corrupt")
    if not isinstance(entry, dict):
        raise SurgeryError(f"{path}: entry for tensor {brief(name)} is not an object; the file is corrupt")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list or object is not hashable
        known = ", ".join(DTYPE_SIZES)
        raise SurgeryError(f"{path}: tensor {brief(name)} has unknown dtype {brief(dtype)} (known: {known})")
    if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
        raise SurgeryError(f"{path}: tensor {brief(name)} has invalid shape {brief(shape)}; the file is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise SurgeryError(
            f"{path}: tensor {brief(name)} has invalid data_offsets {brief(offsets)}; the file is corrupt"
        )
    begin, end = offsets
    if end < begin:
        raise SurgeryError(f"{path}: tensor {brief(name)} has data_offsets [{begin}, {end}] that end before they begin")
    expected = _numel(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        needs = expected if expected < _U64 else "more than 2**64"
        raise SurgeryError(
            f"{path}: tensor {brief(name)} spans {end - begin} bytes but shape {brief(shape)} of {dtype} "
            f"needs {needs}; the file is corrupt"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def brief(value: object, limit: int = 100) -> str:
    """The repr of a value read from a file, cut short: a hostile file must not make a megabyte-long error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_uint(x: object) -> bool:
    # bool is an int subclass; `true` is not a dimension. safetensors stores sizes as u64.
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < _U64


def _numel(shape: list[int]) -> int:
    """The element count of `shape`, capped at 2**64.

    A header listing thousands of huge dimensions must not cost a product of ever larger integers.
    """
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n >= _U64:
            return _U64
    return n


def _is_text(s: object) -> bool:
    """Whether `s` is a str that encodes as UTF-8.

    JSON escapes such as \\ud800 decode to lone surrogates, which safetensors itself refuses and
    which would break every later encoding of the name.
    """
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_header(tensors: list[TensorInfo], metadata: dict[str, str]) -> bytes:
    """Serialize a header (length prefix included), padded to 8 bytes as safetensors does.

    Args:
        tensors: entries with offsets relative to the data region.
        metadata: the `__metadata__` string map.

    Returns:
        The bytes to write at the start of the file.
    """
    obj: dict[str, object] = {"__metadata__": metadata}
    for t in tensors:
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
