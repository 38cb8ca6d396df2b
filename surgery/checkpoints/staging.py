"""Write an output folder so that it either appears complete or not at all, one writer at a time.

Everything is written into a temp folder beside the destination (same filesystem, so the final
rename is atomic), fsynced, then renamed into place. A failure or interrupt removes the temp
folder. A SIGKILL can leave one behind: its name records the process that made it
(`.surgery-tmp-OUT-new-PID-xxxx`), and the next run for the same output removes it, with a note
on stderr, once that process is gone.

A lock beside the destination (`.OUT.surgery-lock`, `flock`) is held from before staging until the
output is published, so two runs writing the same output never interleave: the second one stops
at once with an error. The kernel releases the lock when its holder dies, so a killed run cannot
leave a stale lock; the run that holds it deletes the lock file when it is done.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.fileio import umasked

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked against each other
    fcntl = None  # type: ignore[assignment]


TMP_PREFIX = ".surgery-tmp-"
LOCK_SUFFIX = ".surgery-lock"
# What follows `TMP_PREFIX + OUT + "-"` in a temp folder's name: new output or the replaced one,
# the owner's pid, then mkdtemp's random part (which has no "-", so names of other outputs never match).
_OWNED = re.compile(r"(new|old)-(\d+)-[a-z0-9_]+")


@contextmanager
def staged_folder(out: Path, overwrite: bool, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; publish it as `out` when the block succeeds.

    Holds the output lock from before the temp folder is made until `out` is published, and first
    removes temp folders that killed runs for `out` left behind.

    Args:
        out: the destination folder (resolved).
        overwrite: replace an existing `out`, only after the new one is complete.
        needed_bytes: refuse up front when the filesystem has less free space than this.

    Raises:
        SurgeryError: no space, another run is writing `out`, or the folder cannot be created or
            written (nothing is left behind).
    """
    check_free_space(out, needed_bytes)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(out, e) from None
    with output_lock(out):
        remove_stale(out)
        if out.exists() and not overwrite:
            # Checked again under the lock: another run may have published it since the caller looked.
            raise SurgeryError(f"output {out} already exists; choose a new path or pass --overwrite")
        tmp = _make_temp(out, "new")
        _chmod_like_new(tmp, 0o777)
        try:
            yield tmp
            for p in tmp.rglob("*"):
                # Some writers (safetensors) create files 0600; published files get the usual umask mode.
                # A hard-linked file (transplant --link) is an input's own file: its mode is not ours to change.
                if p.is_file() and p.stat().st_nlink == 1:
                    _chmod_like_new(p, 0o666)
            fsync_tree(tmp)
            _publish(tmp, out, overwrite)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SurgeryError(
                f"writing {out} failed ({e.strerror or e}); nothing was written, fix it and rerun"
            ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock on writing `out` for the `with` block; fail at once if another run holds it.

    Raises:
        SurgeryError: another process holds the lock, or the lock file cannot be created.
    """
    if fcntl is None:
        yield
        return
    path = out.parent / f".{out.name}{LOCK_SUFFIX}"
    fd = _acquire(path, out)
    try:
        yield
    finally:
        # Deleted while still held: a run that opened this file meanwhile sees, once it gets the
        # lock, that the path no longer names its file, and starts over on a fresh one.
        with suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _unwritable(out, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SurgeryError(
                f"another surgery run (pid {holder}) is writing {out}; wait for it to finish or choose another -o"
            ) from None
        except OSError as e:
            os.close(fd)
            raise SurgeryError(f"cannot lock {path} ({e.strerror}); choose an -o on a local filesystem") from None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the previous holder deleted it between our open and our lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def remove_stale(out: Path) -> None:
    """Remove the temp folders that killed runs for `out` left beside it; call with the output lock held.

    A folder whose owner is still alive is left alone (and named on stderr): with the lock held that
    can only be a run of an older surgery, or an unrelated process that reused the pid. When a run
    was killed half-way through replacing `out` (`--overwrite`), the old output is put back first.
    """
    prefix = f"{TMP_PREFIX}{out.name}-"
    for p in sorted(out.parent.iterdir()):
        owned = _OWNED.fullmatch(p.name[len(prefix) :]) if p.name.startswith(prefix) else None
        if owned is None or p.is_symlink() or not p.is_dir():
            continue
        kind, pid = owned.group(1), int(owned.group(2))
        if pid != os.getpid() and _alive(pid):
            _note(f"left {p} alone: process {pid}, which made it, is still running")
            continue
        if kind == "old" and (p / out.name).is_dir() and not out.exists():
            try:
                os.rename(p / out.name, out)
            except OSError as e:
                _note(f"could not restore {out} from {p} ({e.strerror}); move {p / out.name} back by hand")
                continue  # never delete the only copy of an output
            _note(f"restored {out}, which a killed --overwrite run (pid {pid}) had moved aside")
        shutil.rmtree(p, ignore_errors=True)
        if p.exists():
            _note(f"could not remove {p}, left unfinished by an interrupted run (pid {pid}); remove it by hand")
        else:
            _note(f"removed {p}, left unfinished by an interrupted run (pid {pid})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _make_temp(out: Path, kind: str) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-{kind}-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise _unwritable(out, e) from None


def _unwritable(out: Path, e: OSError) -> SurgeryError:
    return SurgeryError(f"cannot create the output in {out.parent} ({e.strerror}); choose a writable -o")


def check_out(out: Path, inputs: dict[str, Path], overwrite: bool) -> Path:
    """Resolve an output folder, refusing one inside or around an input, or one that exists without `overwrite`.

    Args:
        out: the output folder as given.
        inputs: what each input is called in messages (e.g. "target") -> its folder, resolved.
        overwrite: whether an existing `out` may be replaced.

    Returns:
        `out`, resolved.
    """
    resolved = out.resolve()
    for what, folder in inputs.items():
        if resolved == folder or folder in resolved.parents:
            raise SurgeryError(f"output {out.absolute()} is inside the {what} checkpoint; choose a folder outside it")
        if resolved in folder.parents:
            raise SurgeryError(f"output {out.absolute()} contains the {what} checkpoint; choose another folder")
    if resolved.exists() and not overwrite:
        raise SurgeryError(f"output {out.absolute()} already exists; choose a new path or pass --overwrite")
    if resolved.exists() and not resolved.is_dir():
        raise SurgeryError(f"output {out.absolute()} exists and is not a folder; remove it or choose another path")
    return resolved


def check_free_space(out: Path, needed: int) -> None:
    """Refuse up front when the output cannot fit, rather than failing half-way."""
    existing = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise SurgeryError(
            f"output needs {needed / 2**30:.2f} GiB but {existing} has {free / 2**30:.2f} GiB free; "
            "free some space or choose another -o"
        )


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path`, once, after all writing.

    Files already synced by the writer (`direct_write.SyncBehind`) cost next to nothing here.
    """
    for p in sorted(path.rglob("*")):
        fsync_file(p)
    fsync_file(path)


def _chmod_like_new(path: Path, mode: int) -> None:
    # mkdtemp creates 0700 (and some writers 0600); give what a plain mkdir/open would.
    os.chmod(path, umasked(mode))


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp folder to `out`; an old `out` is removed only afterwards.

    A kill between the two renames leaves no `out` but the old one intact in the `old` temp
    folder, from which the next run restores it (`remove_stale`).
    """
    old = None
    if out.exists():
        if not overwrite:
            raise SurgeryError(f"output {out} appeared during the run; choose a new path or pass --overwrite")
        old = _make_temp(out, "old")
        os.rename(out, old / out.name)
    os.rename(tmp, out)
    fsync_file(out.parent)
    if old is not None:
        shutil.rmtree(old)
