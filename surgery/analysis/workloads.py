"""Prompt sets for activation analysis: a JSONL file, or a seeded sample of a vendored train split.

Built-in workloads come from TRAIN splits only, so the modules are never selected on the
problems that evaluation scores (the paper's weak point we fix).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surgery.data import addition_rows, read_jsonl_gz, strip_calculator
from surgery.errors import SurgeryError

# Built-in name -> its (question, gold solution) pairs, from the train splits.
BUILTINS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "gsm8k-train": lambda: [
        (r["question"], strip_calculator(r["answer"]).strip()) for r in read_jsonl_gz("gsm8k-train.jsonl.gz")
    ],
    "math-train": lambda: [(r["problem"], r["solution"]) for r in read_jsonl_gz("math-train.jsonl.gz")],
    "addition-train": lambda: [(r["question"], r["solution"]) for r in addition_rows("train")],
}
_BUILTIN_RE = re.compile(r"^(?P<name>[a-z0-9-]+)(?::(?P<count>\d+))?(?::(?P<seed>\d+))?$")
_PROMPT_FIELDS = ("prompt", "question", "problem")
_SOLUTION_FIELDS = ("solution", "answer")


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a workload, in order, a canonical name, and the gold solutions where it has them.

    `solutions` (one per prompt) is what the loss-based ranking methods (`taylor`, `swap-nll`) and
    `select` measure the teacher-forced NLL of; None for a workload of prompts alone.
    """

    name: str
    prompts: tuple[str, ...]
    solutions: tuple[str, ...] | None = None

    @property
    def sha256(self) -> str:
        """Identifies the exact prompts: two stats files are comparable only if these match."""
        return hashlib.sha256(json.dumps(list(self.prompts)).encode()).hexdigest()


def load_workload(spec: str) -> PromptSet:
    """Resolve a workload spec.

    Args:
        spec: a JSONL file with a `prompt`, `question` or `problem` field per line, or a
            built-in `NAME[:COUNT[:SEED]]`, e.g. `gsm8k-train:64` (seed 0) or `math-train:32:1`.

    Returns:
        The prompts.

    Raises:
        SurgeryError: the file is empty or malformed, or the built-in is unknown or too small.
    """
    path = Path(spec)
    if path.is_file():
        return _from_file(path)
    m = _BUILTIN_RE.match(spec)
    if m is None or m["name"] not in BUILTINS:
        if path.suffix in (".jsonl", ".json") or "/" in spec:
            raise SurgeryError(f"workload file {spec} does not exist; check the path")
        raise SurgeryError(
            f"unknown workload {spec!r}; use a JSONL file or a built-in: "
            + ", ".join(f"{n}:COUNT[:SEED]" for n in BUILTINS)
        )
    rows = BUILTINS[m["name"]]()
    count = int(m["count"]) if m["count"] else 64
    seed = int(m["seed"]) if m["seed"] else 0
    if not 0 < count <= len(rows):
        raise SurgeryError(f"workload {spec!r}: count must be between 1 and {len(rows)}")
    picked = random.Random(seed).sample(range(len(rows)), count)
    return PromptSet(
        f"{m['name']}:{count}:{seed}", tuple(rows[i][0] for i in picked), tuple(rows[i][1] for i in picked)
    )


def require_solutions(prompts: PromptSet, what: str) -> tuple[str, ...]:
    """The workload's gold solutions, or a refusal naming what is missing.

    Raises:
        SurgeryError: the workload has no gold solutions.
    """
    if prompts.solutions is None:
        raise SurgeryError(
            f"{what} needs gold solutions, and workload {prompts.name} has none; use gsm8k-train:N, math-train:N, "
            "or a JSONL with prompt and solution (or question and answer) on every line"
        )
    return prompts.solutions


def _from_file(path: Path) -> PromptSet:
    prompts, solutions = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SurgeryError(f"workload {path}: cannot read ({e}); pass a UTF-8 JSONL file") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            msg = f"workload {path} line {i}: not valid JSON ({e.msg}); write one object per line"
            raise SurgeryError(msg) from None
        text = next((row[f] for f in _PROMPT_FIELDS if isinstance(row, dict) and isinstance(row.get(f), str)), None)
        if not text:
            raise SurgeryError(f"workload {path} line {i}: no non-empty 'prompt' or 'question' string field")
        prompts.append(text)
        solutions.append(next((row[f] for f in _SOLUTION_FIELDS if isinstance(row.get(f), str) and row[f]), None))
    if not prompts:
        raise SurgeryError(f"workload {path} is empty; it needs one JSON object with a 'prompt' per line")
    # Gold solutions only when every line has one: a partial set would score a different workload.
    gold = tuple(solutions) if all(s is not None for s in solutions) else None
    return PromptSet(path.name, tuple(prompts), gold)  # type: ignore[arg-type]
