"""Write output files front to back: through the page cache, or with O_DIRECT for outputs too large for it.

Through the page cache (`direct=False`, or where the filesystem refuses O_DIRECT), bytes that keep
their dtype move with `os.copy_file_range` (in the kernel, no user-space copy), writeback is
started behind the writer (`SyncBehind.flush`), and a copied tensor is hashed by reading it back
on the hashing thread; the output stays in the page cache for the command that usually comes
next (`verify`, `eval`, `push`, a load).

With O_DIRECT (`direct=True`), bytes go through a few page-aligned `BLOCK_BYTES` blocks (`mmap`):
one is filled (read straight into it, and hashed on the hashing thread) while the worker thread
writes the others, and the disk reads each block straight from memory. Nothing goes through the
page cache, so the output does not evict everything else, and the final fsync has only metadata
left to write (on our test VM: dd of 745 MiB with an fdatasync took 1.9-2.1 s, 1.7-1.9 s of it
system time, and the same with O_DIRECT 0.27-0.31 s). O_DIRECT wants the buffer address, the
file offset and the length aligned to the device's logical block (512 or 4096 bytes): a file's
last block is padded to `ALIGN` and the file truncated to its true size after. A filesystem that
refuses O_DIRECT at `open` (tmpfs, some FUSE and network filesystems) or at a write gets the
file through the page cache instead.

Which mode a file gets is chosen by the caller (`transplants.plan.choose_mode`, the one place),
for all the files of a `BlockWriter`; the fallbacks above are this module's. Either way each file is
fsynced (on a worker thread) before the writer is done, and the inputs are read through the page
cache, where they may already be.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from surgery.checkpoints.streaming import hash_range, write_all
from surgery.errors import SurgeryError

try:
    import fcntl
except ImportError:  # not on Windows, which has no O_DIRECT either
    fcntl = None  # type: ignore[assignment]

BLOCK_BYTES = 8 * 2**20
# Blocks in flight: one being filled while the others are written.
BLOCKS = 3
# A multiple of every logical block size in common use (512 and 4096 bytes).
ALIGN = 4096
# 0 where the platform has no O_DIRECT: files are then always written through the page cache.
O_DIRECT = getattr(os, "O_DIRECT", 0) if fcntl is not None else 0


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from libc, or None where there is none (os does not wrap it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait, do not flush the disk's cache


class SyncBehind:
    """Start writing files back while they are written, then fsync and close each, on a worker thread.

    Left alone, the kernel starts writing dirty pages back only past `vm.dirty_background_ratio`
    (10% of RAM), so a run that syncs only at the end then waits for most of its output. Here the
    writer (`direct_write`, through the page cache) calls `flush` after each 64 MiB copy step or
    block it writes, which starts writeback of what is dirty so far
    (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, on Linux), so the disk is kept busy from the first
    bytes on and the final fsync of each file waits only for its last stretch. The writer itself
    never waits: both calls run on the worker and release the GIL.

    Not `fdatasync` per step: each one also flushes the disk's write cache, which on a virtual disk
    can cost more than it saves (measured: a 3.93 GiB transplant took 6.1-8.3 s with an fdatasync
    every 64 MiB, 3.5-4.7 s with sync_file_range, 3.4-4.7 s with no flush-behind at all; in an
    earlier session on the same kind of machine, fdatasync steps had beaten no flush-behind by up to
    3.5 s and sync_file_range matched them). Where there is no sync_file_range, `flush` does nothing
    and each file is synced at `close` only.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="surgery-fsync")
        self._pending: list[Future[None]] = []

    def flush(self, fd: int) -> None:
        """Start writing `fd`'s data so far to disk in the background, unless the worker is still busy.

        Skipping a flush while one runs loses nothing: the next flush, or `close`, covers those bytes.
        """
        if _SYNC_FILE_RANGE is not None and (not self._pending or self._pending[-1].done()):
            # A duplicate, so that the writer may close `fd` (say, on an error) before this runs.
            self._pending.append(self._pool.submit(_writeback_and_close, os.dup(fd)))

    def close(self, fd: int) -> None:
        """Hand over `fd`, whose writing is done: it is fsynced and closed in the background."""
        self._pending.append(self._pool.submit(_sync_and_close, fd))

    def __enter__(self) -> SyncBehind:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._pool.shutdown(wait=True)  # every handed-over fd is closed, whatever happened
        if exc_type is None:
            for done in self._pending:
                done.result()  # an fsync error fails the write


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writeback_and_close(fd: int) -> None:
    """Start writeback of `fd`'s dirty pages, then close it.

    A filesystem or sandbox that does not support the call is not an error (the fsync at `close`
    writes everything); any other failure, an I/O error say, fails the write.
    """
    try:
        if _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:  # offset 0, nbytes 0: the whole file
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


class BlockWriter:
    """Writes files, each front to back: kernel copies through the page cache, or aligned blocks written
    by a worker thread (O_DIRECT; headers and cast tensors in either mode).

    Use as a context manager: on leaving, every file handed over with `OutputFile.close` has been
    written, fsynced and closed, and every `OutputFile.abandon`ed one closed. An error on the worker
    (ENOSPC, EIO) is raised in the writer at its next call, or on leaving; the worker then writes
    nothing more, but still closes every file.
    """

    def __init__(self, *, direct: bool) -> None:
        """`direct`: open files with O_DIRECT, where the platform and the filesystem take it."""
        self._direct = direct and bool(O_DIRECT)
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(BLOCKS):
            self._free.put(mmap.mmap(-1, BLOCK_BYTES))
        self._work: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._synced = SyncBehind()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="surgery-hash")
        self._read_back: list[Future[None]] = []
        self._thread = threading.Thread(target=self._run, name="surgery-write", daemon=True)

    def create(self, path: Path) -> OutputFile:
        """A new file at `path` (which must not exist), filled with `OutputFile.write` and `copy`."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if self._direct:
            try:
                return OutputFile(self, path, os.open(path, flags | O_DIRECT, 0o644), direct=True)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this filesystem does not do O_DIRECT
                    raise
        return OutputFile(self, path, os.open(path, flags, 0o644), direct=False)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def block(self) -> mmap.mmap:
        """A free block, as soon as the worker has written one; raises the worker's error, if any."""
        while True:
            self.check()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def release(self, block: mmap.mmap) -> None:
        self._free.put(block)

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` on the worker, after those before it. Jobs run even after an error (`failed`): they
        must write nothing then, but still close and free what they are handed."""
        self._work.put(job)

    def hash(self, segments: list[tuple[Any, int, int]], block: mmap.mmap) -> Future[None]:
        """Feed each `(digest, start, end)` slice of `block` to its digest, in order, on the hashing thread."""
        return self._hasher.submit(_update, segments, block)

    def hash_back(self, digest: Any, path: Path, offset: int, n: int) -> None:
        """Feed `n` bytes of the file at `path` from `offset`, as written, to `digest` on the hashing thread."""
        self._read_back.append(self._hasher.submit(_update_from_file, digest, path, offset, n))

    def sync_and_close(self, fd: int) -> None:
        self._synced.close(fd)

    def flush(self, fd: int) -> None:
        self._synced.flush(fd)

    def check(self) -> None:
        """Raise the worker's error, if it had one."""
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (job := self._work.get()) is not None:
            try:
                job()
            except BaseException as e:  # handed to the writer, which raises it
                if self._error is None:
                    self._error = e

    def __enter__(self) -> BlockWriter:
        self._synced.__enter__()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._work.put(None)
        self._thread.join()
        self._hasher.shutdown(wait=True)
        if self._error is None:
            for hashed in self._read_back:
                if hashed.exception() is not None:
                    self._error = hashed.exception()
                    break
        failed = exc_type or (type(self._error) if self._error is not None else None)
        self._synced.__exit__(failed)  # waits for every fsync; raises a failed one only if nothing else failed
        if exc_type is None:
            self.check()


class OutputFile:
    """One file being written front to back through a `BlockWriter`.

    Attributes:
        direct: whether its bytes go to the disk with O_DIRECT (False once the filesystem refused it).
        size: the bytes written so far.
    """

    def __init__(self, writer: BlockWriter, path: Path, fd: int, *, direct: bool) -> None:
        self._writer = writer
        self._path = path
        self._fd = fd
        self.direct = direct
        # Through the page cache, `copy` moves bytes in the kernel (`os.copy_file_range`): on our test VM a
        # K = 32 patch took 0.84-1.09 s that way and 1.57-2.75 s read into the blocks and written back.
        self._kernel_copy = not direct and hasattr(os, "copy_file_range")
        self.size = 0
        self._block: mmap.mmap | None = None
        self._used = 0
        self._segments: list[tuple[Any, int, int]] = []

    def write(self, data: bytes | memoryview) -> None:
        """Append `data`."""
        view = memoryview(data)
        while view:
            block = self._fill()
            n = min(len(view), BLOCK_BYTES - self._used)
            block[self._used : self._used + n] = view[:n]
            self._advance(n)
            view = view[n:]

    def copy(self, fd: int, offset: int, n: int, digest: Any | None = None) -> None:
        """Append `n` bytes of `fd` from `offset`: read straight into the block, or copied in the kernel.

        `digest.update` gets them too, on the hashing thread (which reads a kernel copy back from this
        file): read `digest` only once the writer is done.
        """
        if self._kernel_copy and self._copy_in_kernel(fd, offset, n, digest):
            return
        while n > 0:
            block = self._fill()
            with memoryview(block) as whole:
                room = whole[self._used : self._used + min(n, BLOCK_BYTES - self._used)]
                got = os.preadv(fd, [room], offset)
                if got == 0:
                    raise SurgeryError("file ended early while reading; was it modified during the run?")
                room.release()
            if digest is not None:
                self._segments.append((digest, self._used, self._used + got))
            self._advance(got)
            offset, n = offset + got, n - got

    def _copy_in_kernel(self, fd: int, offset: int, n: int, digest: Any | None) -> bool:
        """`copy` with `os.copy_file_range` at the end of the file; False where the kernel or the filesystems
        cannot (nothing was copied then, and this file's copies go through the blocks from now on)."""
        if self._block is not None:
            self._send()  # the bytes before these, written by the worker meanwhile (other offsets)
        start, done = self.size, 0
        try:
            while done < n:
                got = os.copy_file_range(fd, self._fd, min(n - done, 1 << 30), offset + done, start + done)
                if got == 0:
                    raise SurgeryError("file ended early while reading; was it modified during the run?")
                done += got
        except OSError as e:
            if done or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            self._kernel_copy = False
            return False
        self.size += n
        self._writer.flush(self._fd)
        if digest is not None:
            self._writer.hash_back(digest, self._path, start, n)
        return True

    def close(self) -> None:
        """Write what is left, trim the last block's padding and hand the file over to be fsynced and closed."""
        if self._block is not None:
            self._send()
        fd, size, writer = self._fd, self.size, self._writer

        def finish() -> None:
            if writer.failed:
                os.close(fd)
                return
            try:
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
            writer.sync_and_close(fd)

        writer.submit(finish)
        writer.check()

    def abandon(self) -> None:
        """Close the file unfinished (after an error: the output is discarded)."""
        if self._block is not None:
            self._writer.release(self._block)
            self._block = None
        fd = self._fd
        self._writer.submit(lambda: os.close(fd))

    def _fill(self) -> mmap.mmap:
        if self._block is None:
            self._block, self._used = self._writer.block(), 0
        return self._block

    def _advance(self, n: int) -> None:
        self._used += n
        self.size += n
        if self._used == BLOCK_BYTES:
            self._send()

    def _send(self) -> None:
        """Queue the current block for writing at its place in the file."""
        assert self._block is not None
        block, used, offset = self._block, self._used, self.size - self._used
        hashed = self._writer.hash(self._segments, block) if self._segments else None
        self._block, self._segments = None, []
        self._writer.submit(lambda: self._write_block(block, used, offset, hashed))

    def _write_block(self, block: mmap.mmap, used: int, offset: int, hashed: Future[None] | None) -> None:
        """On the worker: write `used` bytes of `block` at `offset` (nothing after an error), and free the
        block once it is hashed too."""
        try:
            if self._writer.failed:
                return
            with memoryview(block) as whole:
                if self.direct:
                    try:
                        write_all(self._fd, offset, whole[: -(-used // ALIGN) * ALIGN])
                        return
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                    # The filesystem took O_DIRECT at open but refuses these writes (it wants a larger
                    # alignment, say): this file goes on through the page cache.
                    assert fcntl is not None
                    fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~O_DIRECT)
                    self.direct = False
                write_all(self._fd, offset, whole[:used])
            self._writer.flush(self._fd)
        finally:
            if hashed is not None:
                hashed.result()
            self._writer.release(block)


def _update(segments: list[tuple[Any, int, int]], block: mmap.mmap) -> None:
    with memoryview(block) as whole:
        for digest, start, end in segments:
            digest.update(whole[start:end])


def _update_from_file(digest: Any, path: Path, offset: int, n: int) -> None:
    """Feed `n` bytes of `path` from `offset` to `digest`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        hash_range(digest, fd, offset, n)
    finally:
        os.close(fd)
