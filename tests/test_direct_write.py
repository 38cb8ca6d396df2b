"""direct_write: files written front to back in aligned blocks, with O_DIRECT where the filesystem takes it."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from surgery import apply, transplant, verify, write_patch
from surgery.checkpoints import direct_write
from surgery.checkpoints.direct_write import ALIGN, BLOCK_BYTES, BlockWriter
from surgery.transplants import plan, write
from tests.helpers import make_model

GIB = 2**30

# Lengths around every boundary the writer handles: empty, unaligned, one alignment unit, one block.
SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, BLOCK_BYTES - 1, BLOCK_BYTES, BLOCK_BYTES + 3, 2 * BLOCK_BYTES + ALIGN + 5]


def takes_o_direct(folder: Path) -> bool:
    """Whether the filesystem of `folder` opens files with O_DIRECT (tmpfs does not)."""
    if not direct_write.O_DIRECT:
        return False
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | direct_write.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.unlink(folder / "probe")
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(params=["direct", "page-cache", "no O_DIRECT here"])
def mode(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "direct" and not takes_o_direct(tmp_path):
        pytest.skip("this filesystem does not take O_DIRECT")
    if request.param == "no O_DIRECT here":
        monkeypatch.setattr(direct_write, "O_DIRECT", 0)  # a platform without it: asked for, not used
    return request.param


def writer_for(mode: str) -> BlockWriter:
    return BlockWriter(direct=mode != "page-cache")


def source_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "input"
    path.write_bytes(os.urandom(n))
    return path


@pytest.mark.parametrize("size", SIZES)
def test_copied_and_written_bytes_land_exactly(tmp_path: Path, mode: str, size: int) -> None:
    data = source_file(tmp_path, size + 7).read_bytes()
    header = b"header-" * 13  # an unaligned start, as a safetensors header is
    digest = hashlib.sha256()
    fd = os.open(tmp_path / "input", os.O_RDONLY)
    try:
        with writer_for(mode) as writer:
            out = writer.create(tmp_path / "out")
            assert out.direct == (mode == "direct")
            out.write(header)
            out.copy(fd, 7, size, digest)  # from an unaligned offset
            out.write(data[:3])
            out.close()
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == header + data[7 : 7 + size] + data[:3]
    assert digest.hexdigest() == hashlib.sha256(data[7 : 7 + size]).hexdigest()


@pytest.mark.parametrize(
    ("setting", "available", "nbytes", "read_next", "direct"),
    [
        (None, 16 * GIB, 4 * GIB, True, False),  # fits in the page cache: the next reader finds it there
        (None, 16 * GIB, 9 * GIB, True, True),  # more than half of what is available
        (None, None, 100 * GIB, True, False),  # memory unknown: the page cache, as every tool does
        (None, 16 * GIB, 1, False, True),  # a patch: O_DIRECT whatever its size
        (None, None, 1, False, True),
        ("1", 16 * GIB, 1, True, True),
        ("on", 16 * GIB, 1, True, True),
        ("0", 16 * GIB, 100 * GIB, True, False),
        ("no", 16 * GIB, 100 * GIB, True, False),
        ("0", 16 * GIB, 1, False, False),  # a patch too, when the user says so
        ("maybe", 16 * GIB, 9 * GIB, True, True),  # not a setting: decided by size
        ("maybe", 16 * GIB, 4 * GIB, True, False),
    ],
)
def test_o_direct_is_for_patches_and_outputs_too_large_to_stay_cached_unless_the_user_says(
    monkeypatch: pytest.MonkeyPatch,
    setting: str | None,
    available: int | None,
    nbytes: int,
    read_next: bool,
    direct: bool,
) -> None:
    if setting is None:
        monkeypatch.delenv(plan.DIRECT_ENV, raising=False)
    else:
        monkeypatch.setenv(plan.DIRECT_ENV, setting)
    monkeypatch.setattr(plan, "_mem_available", lambda: available)
    mode = plan.choose_mode(nbytes, read_next=read_next)
    assert mode.direct is direct
    assert mode.why  # the plan says why (`transplant --dry-run` prints it)


def test_memory_available_is_read_on_linux() -> None:
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo")
    assert plan._mem_available() > 0


@pytest.mark.parametrize("setting", ["1", "0"])
def test_a_transplant_writes_the_same_bytes_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    src, tgt = make_model(tmp_path / "source", 1, shard="20KB"), make_model(tmp_path / "target", 2, shard="20KB")
    monkeypatch.setenv(plan.DIRECT_ENV, setting)
    transplant(target=tgt, source=src, out=tmp_path / "out", modules=["model.layers.*.mlp.*"], progress=False)
    monkeypatch.setenv(plan.DIRECT_ENV, "0" if setting == "1" else "1")
    transplant(target=tgt, source=src, out=tmp_path / "other", modules=["model.layers.*.mlp.*"], progress=False)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1
    for name in shards:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "other" / name).read_bytes()
    verify(tmp_path / "out", target=tgt, source=src)


@pytest.mark.parametrize("reversible", [False, True])
def test_a_patch_is_written_with_o_direct_and_holds_the_same_bytes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reversible: bool
) -> None:
    src, tgt = make_model(tmp_path / "source", 1, shard="20KB"), make_model(tmp_path / "target", 2, shard="20KB")
    chosen: list[bool] = []

    def spy(*, direct: bool) -> BlockWriter:
        chosen.append(direct)
        return BlockWriter(direct=direct)

    monkeypatch.setattr(write, "BlockWriter", spy)
    monkeypatch.delenv(plan.DIRECT_ENV, raising=False)
    mlp = ["model.layers.*.mlp.*"]
    write_patch(target=tgt, source=src, out=tmp_path / "direct", modules=mlp, reversible=reversible, progress=False)
    assert chosen == [True] * (1 + reversible)  # the patch's tensors, and the target's originals
    monkeypatch.setenv(plan.DIRECT_ENV, "0")
    write_patch(target=tgt, source=src, out=tmp_path / "paged", modules=mlp, reversible=reversible, progress=False)
    assert chosen[1 + reversible :] == [False] * (1 + reversible)
    files = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert files == (["original.safetensors", "patch.safetensors"] if reversible else ["patch.safetensors"])
    for name in files:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "paged" / name).read_bytes()
    applied = apply(tmp_path / "direct", tgt, tmp_path / "applied", progress=False)
    assert applied.tensors
    verify(tmp_path / "applied", target=tgt, source=src)


def test_many_files_through_one_writer(tmp_path: Path, mode: str) -> None:
    blobs = {f"f{i}": os.urandom(i * BLOCK_BYTES // 3 + i) for i in range(5)}
    with writer_for(mode) as writer:
        for name, blob in blobs.items():
            out = writer.create(tmp_path / name)
            out.write(blob)
            out.close()
    assert {name: (tmp_path / name).read_bytes() for name in blobs} == blobs


def test_a_write_refused_for_alignment_goes_on_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A filesystem can take O_DIRECT at open and refuse a write (EINVAL: it wants a larger alignment).
    real = direct_write.write_all
    refused = []

    def picky(fd: int, offset: int, data: memoryview) -> None:
        if not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real(fd, offset, data)

    monkeypatch.setattr(direct_write, "write_all", picky)
    blob = os.urandom(2 * BLOCK_BYTES + 100)
    with BlockWriter(direct=False) as writer:
        out = writer.create(tmp_path / "out")
        out.direct = True  # as if the open had taken O_DIRECT, whatever this filesystem does
        out.write(blob)
        out.close()
    assert refused == [0]
    assert not out.direct
    assert (tmp_path / "out").read_bytes() == blob


@pytest.mark.parametrize("code", [errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP])
def test_copies_go_through_the_blocks_where_the_kernel_cannot_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    data = source_file(tmp_path, BLOCK_BYTES + 5).read_bytes()
    calls = []

    def unsupported(*args: object) -> int:
        calls.append(args)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    digest = hashlib.sha256()
    fd = os.open(tmp_path / "input", os.O_RDONLY)
    try:
        with BlockWriter(direct=False) as writer:
            out = writer.create(tmp_path / "out")
            out.copy(fd, 0, 100, digest)
            out.copy(fd, 100, len(data) - 100, digest)
            out.close()
    finally:
        os.close(fd)
    assert len(calls) == 1  # tried once, then the blocks for the rest of the file
    assert (tmp_path / "out").read_bytes() == data
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="copies through the blocks here: nothing is read back")
def test_a_failed_read_back_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Through the page cache a copy is hashed by reading the written bytes back, on the hashing thread.
    def unreadable(*args: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(direct_write, "_update_from_file", unreadable)
    source_file(tmp_path, 100)
    fd = os.open(tmp_path / "input", os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="Input/output error"), BlockWriter(direct=False) as writer:
            out = writer.create(tmp_path / "out")
            out.copy(fd, 0, 100, hashlib.sha256())
            out.close()
    finally:
        os.close(fd)


def test_a_failed_write_is_raised_and_every_file_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, data: memoryview) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(direct_write, "write_all", full)
    before = open_fds()
    with pytest.raises(OSError, match="No space left"), BlockWriter(direct=True) as writer:
        first = writer.create(tmp_path / "first")
        first.write(b"x" * 10)
        first.close()  # the worker fails on this file's block...
        second = writer.create(tmp_path / "second")
        try:
            for _ in range(2 * direct_write.BLOCKS):  # ...and the writer hears of it before long
                second.write(b"y" * BLOCK_BYTES)
        except BaseException:
            second.abandon()
            raise
    assert open_fds() == before


def test_an_interrupted_writer_closes_its_files(tmp_path: Path) -> None:
    before = open_fds()
    with pytest.raises(KeyboardInterrupt), BlockWriter(direct=True) as writer:
        out = writer.create(tmp_path / "out")
        out.write(b"z" * (BLOCK_BYTES + 1))
        out.abandon()
        raise KeyboardInterrupt
    assert open_fds() == before


def test_a_file_that_ends_early_is_an_error(tmp_path: Path, mode: str) -> None:
    source_file(tmp_path, 100)
    fd = os.open(tmp_path / "input", os.O_RDONLY)
    try:
        with pytest.raises(Exception, match="ended early"), writer_for(mode) as writer:
            out = writer.create(tmp_path / "out")
            try:
                out.copy(fd, 50, 100)
            except BaseException:
                out.abandon()
                raise
    finally:
        os.close(fd)
