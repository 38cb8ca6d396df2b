"""Vendored datasets (GSM8K, MATH, general text; see LICENSES.md), their reader, and generated ones.

Generated: 2-digit addition, and docstrings of the standard library (the demo's "bad update" trains on
some of them; the rest are a keep set).
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import random
import re
import warnings
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


def general_text() -> list[str]:
    """The vendored general-text keep set: paragraphs of everyday prose (`general-text.jsonl.gz`, MIT)."""
    return [r["text"] for r in read_jsonl_gz("general-text.jsonl.gz")]


# Docstrings of these standard-library modules and their public members: unrelated text for the rollback
# pairs' "bad update". Offline and deterministic for a given Python version.
DOC_MODULES = (
    "argparse", "asyncio", "collections", "csv", "datetime", "email.message", "functools", "http.client",
    "itertools", "json", "logging", "os", "pathlib", "re", "shutil", "socket", "sqlite3", "string",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile",
)  # fmt: skip
# The demo recipes train on the first N docstrings of `stdlib_docstrings()` shuffled by `Random(0)`, N at
# most this (`ROLLBACK`: 30 steps of 8); the docstrings after it are held out.
DOCS_TRAINED = 240
# A held-out docstring is cut to this many characters (at a space): a keep set's rows stay comparable in length.
DOC_CHARS = 1000


def stdlib_docstrings() -> list[str]:
    """Docstrings over 200 characters of `DOC_MODULES` and their public members, de-duplicated, in a fixed order."""
    docs: dict[str, None] = {}  # ordered and de-duplicated: members are re-exported across modules
    with warnings.catch_warnings():  # getattr on deprecated aliases (typing.io, ...) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in DOC_MODULES:
            module = importlib.import_module(name)
            for obj in (module, *(getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_"))):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    docs[doc] = None
    return list(docs)


def held_out_docstrings() -> list[str]:
    """The docstrings no demo recipe trains on (after the first `DOCS_TRAINED` of the seed-0 order), each cut to
    about `DOC_CHARS` characters: the keep set of what the rollback pairs' update was for."""
    texts = stdlib_docstrings()
    random.Random(0).shuffle(texts)
    return [t if len(t) <= DOC_CHARS else t[: t.rfind(" ", 0, DOC_CHARS)] for t in texts[DOCS_TRAINED:]]
