"""Vendored datasets (GSM8K, MATH; see LICENSES.md) and their reader."""

from __future__ import annotations

import gzip
import json
from importlib import resources


def read_jsonl_gz(filename: str) -> list[dict]:
    """Rows of a vendored data file in `surgery/data/`."""
    with resources.files("surgery.data").joinpath(filename).open("rb") as raw, gzip.open(raw, "rt") as f:
        return [json.loads(line) for line in f]
