"""Write an output folder so that it either appears complete or not at all.

Everything is written into a temp folder beside the destination (same filesystem, so the final
rename is atomic), fsynced, then renamed into place. A failure or interrupt removes the temp
folder; a SIGKILL can leave one behind, recognisable by its prefix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgery.errors import SurgeryError

TMP_PREFIX = ".surgery-tmp-"


@contextmanager
def staged_folder(out: Path, overwrite: bool, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; publish it as `out` when the block succeeds.

    Args:
        out: the destination folder (resolved).
        overwrite: replace an existing `out`, only after the new one is complete.
        needed_bytes: refuse up front when the filesystem has less free space than this.

    Raises:
        SurgeryError: no space, or the folder cannot be created or written (nothing is left behind).
    """
    check_free_space(out, needed_bytes)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent))
    except OSError as e:
        raise SurgeryError(f"cannot create the output in {out.parent} ({e.strerror}); choose a writable -o") from None
    _chmod_like_new(tmp, 0o777)
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                # Some writers (safetensors) create files 0600; published files get the usual umask mode.
                _chmod_like_new(p, 0o666)
        fsync_tree(tmp)
        _publish(tmp, out, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SurgeryError(f"writing {out} failed ({e.strerror or e}); nothing was written, fix it and rerun") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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

    Syncing each shard as soon as it is written would make the next shard wait for the disk;
    syncing at the end lets the kernel write back in the background while we copy.
    """
    for p in sorted(path.rglob("*")):
        fsync_file(p)
    fsync_file(path)


def _chmod_like_new(path: Path, mode: int) -> None:
    # mkdtemp creates 0700 (and some writers 0600); give what a plain mkdir/open would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp folder to `out`; an old `out` is removed only afterwards."""
    old = None
    if out.exists():
        if not overwrite:
            raise SurgeryError(f"output {out} appeared during the run; choose a new path or pass --overwrite")
        old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-old-", dir=out.parent))
        os.rename(out, old / out.name)
    os.rename(tmp, out)
    fsync_file(out.parent)
    if old is not None:
        shutil.rmtree(old)
