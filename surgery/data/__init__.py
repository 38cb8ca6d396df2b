"""Vendored datasets (GSM8K, MATH; see LICENSES.md), their reader, and a generated one (2-digit addition)."""

from __future__ import annotations

import gzip
import json
import random
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


def addition_rows(split: str) -> list[dict[str, str]]:
    """Two-digit addition ("What is 47 + 38?"), generated here: 500 test and 7600 train problems, disjoint.

    Every pair (a, b) with 10 <= a, b <= 99 appears once, in a fixed seeded order; the first 500 are
    the test split. The solution is one line and a GSM8K-style final line, so `eval`'s GSM8K grader
    reads it. A task a 135M model can learn in a few steps, and lose again: what the demo needs.
    """
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(0).shuffle(pairs)
    chosen = pairs[:500] if split == "test" else pairs[500:]
    return [
        {"question": f"What is {a} + {b}?", "answer": str(a + b), "solution": f"{a} + {b} = {a + b}.\n#### {a + b}"}
        for a, b in chosen
    ]
