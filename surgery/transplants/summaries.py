"""The evaluation summaries a transplant's model card reports: read, checked, and matched to the output.

Kept apart from `card.py` so that reading them does not import huggingface_hub's card classes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.fileio import read_json_object

_SUMMARY_FIX = "pass the summary.json written by `surgery eval`"


def load_eval_summary(path: str | Path) -> dict:
    """Read and check an evaluation summary written by `surgery eval` (its `summary.json`).

    Args:
        path: the summary file.

    Returns:
        The summary.

    Raises:
        SurgeryError: the file is missing, not JSON, or lacks the fields of an eval summary.
    """
    path = Path(path)
    if path.is_dir():
        raise SurgeryError(f"{path}: is a folder; {_SUMMARY_FIX} (inside it)")
    s = read_json_object(path, "eval summary", _SUMMARY_FIX)

    def bad(field: str, want: str) -> SurgeryError:
        return SurgeryError(f"{path}: not an eval summary ({field!r} missing or not {want}); {_SUMMARY_FIX}")

    if not isinstance(s.get("benchmark"), str) or not s["benchmark"]:
        raise bad("benchmark", "a name")
    for field in ("problems", "correct"):
        if not _is_int(s.get(field)) or s[field] < 0:
            raise bad(field, "a count")
    if s["problems"] == 0 or s["correct"] > s["problems"]:
        raise bad("correct", "at most 'problems' (> 0)")
    if not _is_fraction(s.get("accuracy")):
        raise bad("accuracy", "a number in [0, 1]")
    ci = s.get("accuracy_ci95")
    if not (isinstance(ci, list) and len(ci) == 2 and all(_is_fraction(x) for x in ci) and ci[0] <= ci[1]):
        raise bad("accuracy_ci95", "an interval [low, high] in [0, 1]")
    if not isinstance(s.get("settings", {}), dict):
        raise bad("settings", "an object")
    return s


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_fraction(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 <= x <= 1


def foreign_summaries(paths: Sequence[str | Path], summaries: list[dict], expected: str, force: bool) -> list[str]:
    """Refuse eval summaries of another model than the output (unless `force`: then notes for the card).

    A summary records the fingerprint of the model it measured (`eval` of a folder, `eval --patch`, or a
    `sweep` of this selection all record the output's); the card's scores must be this output's.
    """
    notes = []
    for path, s in zip(paths, summaries, strict=True):
        measured = str(s.get("settings", {}).get("model_fingerprint"))
        if measured == expected:
            continue
        msg = f"{path} measured another model (fingerprint {measured[:19]}…) than this output ({expected[:19]}…)"
        if not force:
            raise SurgeryError(
                f"{msg}; pass the summary of an eval of this output (or of a sweep of this selection), "
                "or --force to attach it with a note in the card"
            )
        print(f"warning: {msg}; attached because of --force, with a note in the card", file=sys.stderr)
        notes.append(
            f"`{Path(path).name}` ({s['benchmark']}) was measured on another model (fingerprint `{measured}`), "
            "not this one; it was attached with --force."
        )
    return notes
