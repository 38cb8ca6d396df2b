"""Fuzz the safetensors header parser and the checkpoint opener with hypothesis.

    .venv/bin/python fuzz/fuzz_headers.py [--headers 10000] [--folders 3000] [--seed 0]

For every generated input, however malformed:

- `read_header`, and `open_checkpoint` with the summary and fingerprint (which read tensor bytes),
  return or raise `SurgeryError`; nothing else escapes;
- parsing a header allocates at most `alloc_bound(file size)`: what a header claims (a 10 TB
  tensor, a 1 GB header) never sizes an allocation;
- no file outside the checkpoint folder is opened, whatever the index names (`..`, absolute paths,
  odd strings) or the folder's symlinks point at (a valid shard and config wait outside as bait).

Prints the cases run per target, the wall time and every failure; exits 1 if there was any.
tests/test_fuzz.py runs the same properties on a few hundred derandomized examples and replays the
seed corpus in tests/fuzz_corpus/.
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from surgery.checkpoints.files import INDEX_FILE, SINGLE_FILE
from surgery.checkpoints.folder import open_checkpoint
from surgery.checkpoints.header import DTYPE_SIZES, read_header
from surgery.errors import SurgeryError

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
TENSORS = ["a", "b", "c"]
REAL_SHARD = "real.safetensors"
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}
# Error messages quote paths and values from the file; values are cut short, so lines stay readable.
MAX_MESSAGE = 1000


def alloc_bound(file_size: int) -> int:
    """Bytes a header parse may allocate: a fixed slack plus a multiple of the file's real size.

    JSON objects cost tens of bytes per byte of text; nothing may scale with a claimed size.
    """
    return 1024 * 1024 + 64 * file_size


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------

ODD_NUMBERS = st.sampled_from([-1, 2**63, 2**64 - 1, 2**64, 2**70, 10**13, 10**100, 0.5, float("nan"), True])
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), ODD_NUMBERS, st.text(max_size=6))
JSON_ANY = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
SIZE = st.one_of(st.integers(0, 6), ODD_NUMBERS, JSON_ANY)


@st.composite
def tiled_tensors(draw: st.DrawFn) -> tuple[dict, int]:
    """A valid header object (tensors tiling the data region exactly) and its data length."""
    header: dict = {}
    offset = 0
    for name in draw(st.lists(st.text(min_size=1, max_size=4), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = DTYPE_SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return header, offset


def _mutate(draw: st.DrawFn, header: dict) -> None:
    """One change that breaks (or, sometimes, keeps) a valid header."""
    names = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    what = draw(st.sampled_from(["field", "dtype", "offsets", "metadata", "entry", "delete", "rename"]))
    if names and what in ("field", "dtype", "offsets", "delete"):
        entry = header[draw(st.sampled_from(names))]
        if what == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(JSON_ANY)
        elif what == "dtype":
            entry["dtype"] = draw(st.sampled_from([*DTYPE_SIZES, "F12", "f32", "Q4_K", ""]))
        elif what == "offsets":
            entry["data_offsets"] = draw(st.lists(SIZE, max_size=3))
        elif what == "delete":
            entry.clear()
    elif what == "metadata":
        header["__metadata__"] = draw(
            st.one_of(JSON_ANY, st.dictionaries(st.text(max_size=4), st.text(max_size=4) | JSON_ANY, max_size=3))
        )
    elif what == "rename" and names:
        header[draw(st.sampled_from(["\ud800", "__metadata__", "", "x" * 300]))] = header.pop(names[0])
    else:
        header[draw(st.text(max_size=4))] = draw(JSON_ANY)


@st.composite
def header_files(draw: st.DrawFn) -> bytes:
    """The bytes of a whole would-be safetensors file: mostly near-valid, some plain garbage."""
    kind = draw(st.sampled_from(["structured", "structured", "structured", "json", "bytes", "deep"]))
    data_len = 0
    if kind == "structured":
        header, data_len = draw(tiled_tensors())
        for _ in range(draw(st.integers(0, 3))):
            _mutate(draw, header)
        raw = json.dumps(header).encode("utf-8", "surrogatepass")
        data_len = max(0, data_len + draw(st.sampled_from([0, 0, 0, -1, 1, 8])))
    elif kind == "json":
        raw = json.dumps(draw(JSON_ANY)).encode()
    elif kind == "bytes":
        raw = draw(st.binary(max_size=200))
    else:
        raw = draw(st.sampled_from([b"[", b'{"a":', b'{"a":{"shape":['])) * draw(st.integers(1, 50_000))
    raw = _text_mutation(draw, raw)
    length = draw(
        st.one_of(
            st.just(len(raw)),
            st.just(len(raw)),
            st.integers(0, len(raw) + 16),
            st.sampled_from([2**30, 2**63, 2**64 - 1, 100 * 1024 * 1024, 100 * 1024 * 1024 + 1]),
        )
    )
    blob = struct.pack("<Q", length) + raw + b"\0" * min(data_len, 1 << 16)
    return blob[: draw(st.sampled_from([len(blob), len(blob), len(blob), draw(st.integers(0, len(blob)))]))]


def _text_mutation(draw: st.DrawFn, raw: bytes) -> bytes:
    """Byte-level damage JSON-level changes cannot make: bad UTF-8, huge literals, escapes, padding."""
    what = draw(st.sampled_from(["none", "none", "flip", "insert", "pad"]))
    if what == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    if what == "insert":
        at = draw(st.integers(0, len(raw)))
        junk = draw(st.sampled_from([b"9" * 5000, b'"\\ud800"', b"\xff", b"NaN", b"1e999", b"-0", b",", b"}"]))
        return raw[:at] + junk + raw[at:]
    if what == "pad":
        return raw + b" " * draw(st.integers(1, 9))
    return raw


# What an index may name as a shard: real ones, ways out of the folder ({outside} becomes the bait's
# absolute path), names no filesystem takes, and (from JSON_LEAF) things that are not names at all.
ODD_NAMES = ["../outside/secret.safetensors", "{outside}/secret.safetensors", "sub/x.safetensors", "..", ".", ""]
ODD_NAMES += ["a\\b", "x\0y", "\ud800", "link.safetensors", "dir.safetensors"]
SHARD_NAMES = st.sampled_from([*SHARDS, SINGLE_FILE, *ODD_NAMES]) | JSON_LEAF
SHARD_KINDS = st.sampled_from(["valid", "valid", "valid", "valid", "missing", "garbage", "dir", "link-in", "stale"])
CONFIG_KINDS = st.sampled_from(["valid", "valid", "valid", "missing", "garbage", "list", "odd-text"])
# At most one planted link per folder, so that most folders get past the link check to the index and headers.
HOSTILE = st.sampled_from([None] * 12 + ["shard-out", "shard-loop", "config-out", "file-out", "dir-out", "file-in"])


@st.composite
def folder_specs(draw: st.DrawFn) -> dict:
    """A checkpoint folder to build: index (or none), each shard file's kind, the config's kind, a planted link."""
    indexed = draw(st.booleans())
    weight_map = {t: draw(SHARD_NAMES) for t in draw(st.lists(st.sampled_from(TENSORS), min_size=1, unique=True))}
    index = (
        {"weight_map": weight_map}
        if draw(st.integers(0, 9))
        else draw(st.one_of(JSON_ANY, st.just({"weight_map": {}}), st.just({"weight_map": weight_map, "x": 1})))
    )
    return {
        "index": index if indexed else None,
        "shards": {name: draw(SHARD_KINDS) for name in [*SHARDS, SINGLE_FILE]},
        "config": draw(CONFIG_KINDS),
        "link": draw(HOSTILE),
        "link_name": draw(st.sampled_from([*SHARDS, SINGLE_FILE, "link.safetensors"])),
    }


# ---------------------------------------------------------------------------------------------
# Building folders
# ---------------------------------------------------------------------------------------------


def safetensors_bytes(tensors: list[str]) -> bytes:
    """A valid file holding one F32 scalar per name."""
    header = {name: {"dtype": "F32", "shape": [], "data_offsets": [4 * i, 4 * i + 4]} for i, name in enumerate(tensors)}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0\0\x80\x3f" * len(tensors)


def make_bait(root: Path) -> Path:
    """A folder outside any checkpoint with a valid shard and config: opening them would succeed."""
    outside = root / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.safetensors").write_bytes(safetensors_bytes(TENSORS))
    (outside / "config.json").write_text(json.dumps(CONFIG))
    return outside


def build_folder(spec: dict, root: Path) -> Path:
    """Write the checkpoint folder `spec` describes as `root/ckpt`, beside the bait in `root/outside`."""
    outside = make_bait(root)
    folder = root / "ckpt"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    index = spec["index"]
    if index is not None:
        text = json.dumps(index).replace("{outside}", str(outside))
        (folder / INDEX_FILE).write_bytes(text.encode("utf-8", "surrogatepass"))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    weight_map = weight_map if isinstance(weight_map, dict) else {}
    (folder / REAL_SHARD).write_bytes(safetensors_bytes(TENSORS))  # what "link-in" shards point to
    for name, kind in spec["shards"].items():
        mine = [t for t, s in weight_map.items() if s == name] or ([] if index is not None else TENSORS)
        _write_shard(folder / name, kind, mine)
    _write_config(folder, spec["config"])
    _plant_link(folder, outside, spec["link"], spec["link_name"])
    return folder


def _plant_link(folder: Path, outside: Path, kind: str | None, shard: str) -> None:
    if kind is None:
        return
    name = {"config-out": "config.json", "shard-out": shard, "shard-loop": shard}.get(kind, "tokenizer.json")
    dest = {
        "shard-out": outside / "secret.safetensors",
        "shard-loop": folder / name,
        "config-out": outside / "config.json",
        "file-out": outside / "secret.safetensors",
        "dir-out": outside,
        "file-in": folder / "config.json",
    }[kind]
    path = folder / name
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink(missing_ok=True)
    path.symlink_to(dest)


def _write_shard(path: Path, kind: str, tensors: list[str]) -> None:
    if kind in ("valid", "stale"):
        # A stale shard holds other tensors than the index says (or one more).
        path.write_bytes(safetensors_bytes(tensors if kind == "valid" else [*tensors[1:], "z"]))
    elif kind == "garbage":
        path.write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all")
    elif kind == "link-in":
        path.symlink_to(REAL_SHARD)
    elif kind == "dir":
        path.mkdir()


def _write_config(folder: Path, kind: str) -> None:
    path = folder / "config.json"
    if kind == "valid":
        path.write_text(json.dumps(CONFIG))
    elif kind == "garbage":
        path.write_bytes(b"\xff{")
    elif kind == "list":
        path.write_text("[1, 2]")
    elif kind == "odd-text":
        path.write_text(json.dumps({**CONFIG, "text_config": 5, "num_hidden_layers": "x"}))


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@contextmanager
def peak_allocation() -> Iterator[list[int]]:
    """Yield a one-item list that holds, after the block, the peak bytes allocated within it."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    box = [0]
    try:
        yield box
    finally:
        box[0] = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()


@contextmanager
def opened_files() -> Iterator[list[Path]]:
    """Record every path opened by name (builtins.open, io.open, os.open) within the block."""
    seen: list[Path] = []

    def wrap(real: Callable) -> Callable:
        def recording(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                seen.append(Path(os.fsdecode(file)))
            return real(file, *args, **kwargs)

        return recording

    saved = builtins.open, io.open, os.open
    builtins.open, io.open, os.open = wrap(saved[0]), wrap(saved[1]), wrap(saved[2])
    try:
        yield seen
    finally:
        builtins.open, io.open, os.open = saved


def check_header_bytes(data: bytes, work: Path) -> str | None:
    """Write `data` as a file and parse it; assert the properties. Returns the refusal, or None if accepted."""
    path = work / "fuzz.safetensors"
    path.write_bytes(data)
    with peak_allocation() as peak:
        try:
            header = read_header(path)
            refusal = None
        except SurgeryError as e:
            header, refusal = None, _one_line(e)
    assert peak[0] <= alloc_bound(len(data)), f"parsing a {len(data)}-byte file allocated {peak[0]} bytes"
    if header is not None:
        # What an accepted header promises: tensors tile the data region exactly.
        assert sum(t.nbytes for t in header.tensors) == len(data) - header.data_start
    return refusal


def check_folder(folder: Path) -> str | None:
    """Open `folder` as a checkpoint and describe it; assert the properties. Returns the refusal, or None."""
    with opened_files() as opened:
        try:
            open_checkpoint(folder).summary()  # the summary reads samples of every tensor (fingerprint)
            refusal = None
        except SurgeryError as e:
            refusal = _one_line(e)
    inside = folder.resolve()
    for p in opened:
        real = Path(os.path.realpath(p))  # unlike Path.resolve, never raises on a symlink loop
        assert real == inside or inside in real.parents, f"opened {p} ({real}), outside {inside}"
    return refusal


def _one_line(e: SurgeryError) -> str:
    """The message, checked to be what the CLI can print: one line of sane length."""
    message = str(e)
    assert "\n" not in message and len(message) < MAX_MESSAGE, f"a bad error message: {message[:300]!r}..."
    return message


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _run(name: str, strategy: st.SearchStrategy, check: Callable, examples: int, rng_seed: int) -> dict:
    counts = {"cases": 0, "ok": 0, "refused": 0}
    failure = None

    @seed(rng_seed)
    @settings(max_examples=examples, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(example) -> None:
        counts["cases"] += 1
        counts["ok" if check(example) is None else "refused"] += 1

    t0 = time.perf_counter()
    try:
        prop()
    except Exception as e:  # the falsifying example is in the notes hypothesis adds
        failure = "\n".join(_describe(x) for x in getattr(e, "exceptions", [e]))
    return {"target": name, **counts, "seconds": round(time.perf_counter() - t0, 1), "failure": failure}


def _describe(e: BaseException) -> str:
    return "\n".join([f"{type(e).__name__}: {str(e)[:500]}", *getattr(e, "__notes__", [])])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headers", type=int, default=10000, help="header files to generate")
    parser.add_argument("--folders", type=int, default=3000, help="checkpoint folders to generate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    # In memory where there is a tmpfs: creating a file per case on a busy disk costs more than the parse.
    ram = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="surgery-fuzz-", dir=ram) as tmp:
        work = Path(tmp)
        results = [
            _run("read_header", header_files(), lambda data: check_header_bytes(data, work), args.headers, args.seed),
            _run(
                "open_checkpoint",
                folder_specs(),
                lambda spec: check_folder(build_folder(spec, work)),
                args.folders,
                args.seed,
            ),
        ]
    for r in results:
        print(f"{r['target']}: {r['cases']} cases ({r['ok']} accepted, {r['refused']} refused) in {r['seconds']} s")
        if r["failure"]:
            print(f"  FAILURE:\n{r['failure']}")
    total = sum(r["cases"] for r in results)
    failures = sum(bool(r["failure"]) for r in results)
    print(f"total: {total} cases, {failures} failures, {time.perf_counter() - t0:.1f} s wall")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
