"""Vendored datasets (GSM8K, MATH; see LICENSES.md) and their reader."""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


def read_jsonl_gz(filename: str) -> list[dict]:
    """Rows of a vendored data file in `surgery/data/`."""
    with resources.files("surgery.data").joinpath(filename).open("rb") as raw, gzip.open(raw, "rt") as f:
        return [json.loads(line) for line in f]


def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations: "48/2 = <<48/2=24>>24" -> "48/2 = 24".

    Args:
        text: a GSM8K solution.

    Returns:
        The solution without `<<...>>` annotations.
    """
    return _CALCULATOR_RE.sub("", text)
