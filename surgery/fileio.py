"""Small files: JSON read with one-line errors, and atomic (temp + fsync + rename) writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from surgery.errors import SurgeryError


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
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SurgeryError(f"{path}: no such {what}; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurgeryError(f"{path}: {what} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise SurgeryError(f"{path}: {what} is not a JSON object; {fix}")
    return obj


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a torn one.

    The bytes go to a temp file beside `path`, are fsynced, then renamed over it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: object) -> None:
    """`write_atomic` of indented JSON with a final newline."""
    write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
