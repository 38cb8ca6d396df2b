"""Small files: JSON read with one-line errors, and atomic (temp + fsync + rename) writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from surgery.errors import SurgeryError

# Real indexes and configs are kilobytes to a few MB; the cap keeps a hostile one from filling memory.
MAX_JSON_BYTES = 100 * 1024 * 1024


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """Parse `path` as a JSON object.

    Args:
        path: the file.
        what: what the file is, for messages (e.g. "manifest").
        fix: what the user should do, appended to every message.

    Returns:
        The parsed object.

    Raises:
        SurgeryError: the file is missing, unreadable, not JSON, or not an object.
    """
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            limit = f"over the {MAX_JSON_BYTES} byte limit"
            raise SurgeryError(f"{path.absolute()}: {what} is {size} bytes, {limit}; {fix}")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SurgeryError(f"{path.absolute()}: no such {what}; {fix}") from None
    except RecursionError:
        raise SurgeryError(f"{path.absolute()}: {what} is nested too deeply to be valid; {fix}") from None
    except (OSError, ValueError) as e:  # ValueError: bad UTF-8, bad JSON, an integer of thousands of digits
        raise SurgeryError(f"{path.absolute()}: {what} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise SurgeryError(f"{path}: {what} is not a JSON object; {fix}")
    return obj


def umasked(mode: int) -> int:
    """`mode` as a plain open()/mkdir() would create it under this process's umask."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return mode & ~umask


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a torn one.

    The bytes go to a temp file beside `path`, are fsynced, then renamed over it. `durable=False`
    skips the fsync, for files that may be lost: after a crash such a file can be empty or cut short
    (a cache entry, then recomputed), but a killed process still leaves the old file or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would, so manifests and results are shareable.
        os.fchmod(fd, umasked(0o666))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: object, *, durable: bool = True) -> None:
    """`write_atomic` of indented JSON with a final newline."""
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"), durable=durable)


def check_new_file(path: Path, overwrite: bool) -> None:
    """Refuse an output file that exists (unless `overwrite`) or is a folder: the rule of every `-o`."""
    if path.is_dir():
        raise SurgeryError(f"output {path.absolute()} is a folder; pass a file path")
    if path.exists() and not overwrite:
        raise SurgeryError(f"output {path.absolute()} already exists; choose a new path or pass --overwrite")
