"""Reading small JSON files (configs, indexes, manifests, records) with one-line errors."""

from __future__ import annotations

import json
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
