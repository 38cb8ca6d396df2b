"""surgery's cache folder: results derived from checkpoints, kept between runs, always safe to delete.

`~/.cache/surgery/` (under `$XDG_CACHE_HOME` when set; `SURGERY_CACHE` moves it), one subfolder
per kind: `candidates/` (`find_candidates`) and `digests/` (`tensor_digests`). Entries are JSON
files named by the sha256 of what their content depends on (for digests, the file's identity as
its stat gives it: see `digests.py`), so an entry whose inputs changed is not found, only left
behind. A cache that cannot be read or written costs the next run its work, nothing else.
"""

from __future__ import annotations

import json
import os
from contextlib import suppress
from pathlib import Path

from surgery.fileio import write_json_atomic

CACHE_ENV = "SURGERY_CACHE"


def cache_file(kind: str, key: str) -> Path:
    """Where the `kind` entry named `key` (a hex digest) lives."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "surgery"
    return Path(root) / kind / f"{key}.json"


def read_entry(path: Path) -> object | None:
    """A cached JSON value, or None when absent or unreadable (the caller then recomputes it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_entry(path: Path, obj: object) -> None:
    """Write an entry atomically, not durably: an entry a crash cuts short is unreadable, so recomputed.

    No fsync: on ext4 it would wait for the journal, and so for the output being written beside it.
    An unwritable cache is not an error.
    """
    with suppress(OSError):
        write_json_atomic(path, obj, durable=False)
