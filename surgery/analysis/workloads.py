"""Prompt sets for activation analysis: a JSONL file, or a seeded sample of a vendored train split.

Built-in workloads come from TRAIN splits only, so the modules are never selected on the
problems that evaluation scores (the paper's weak point we fix). Two built-ins are plain text, the
keep sets (`--keep`) of what a patched model must not lose: `general-text` (vendored prose) and
`stdlib-docs` (standard-library docstrings that no demo recipe trains on).

A JSONL line is a prompt and maybe a solution (`prompt`/`question`/`problem`, `solution`/`answer`), or
plain `text`, scored on every token after the first. `surgery solutions` writes prompts as the model
saw them (`"prompt_format": "chat"` or `"plain"`): those are used as they are, never templated again.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surgery.data import addition_rows, general_text, held_out_docstrings, read_jsonl_gz, strip_calculator
from surgery.errors import SurgeryError

# Built-in name -> its (question, gold solution) pairs, from the train splits.
BUILTINS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "gsm8k-train": lambda: [
        (r["question"], strip_calculator(r["answer"]).strip()) for r in read_jsonl_gz("gsm8k-train.jsonl.gz")
    ],
    "math-train": lambda: [(r["problem"], r["solution"]) for r in read_jsonl_gz("math-train.jsonl.gz")],
    "addition-train": lambda: [(r["question"], r["solution"]) for r in addition_rows("train")],
    # Plain text (an empty prompt, the text as the solution): the keep sets.
    "general-text": lambda: [("", t) for t in general_text()],
    "stdlib-docs": lambda: [("", t) for t in held_out_docstrings()],
}
TEXT_BUILTINS = ("general-text", "stdlib-docs")
_BUILTIN_RE = re.compile(r"^(?P<name>[a-z0-9-]+)(?::(?P<count>\d+))?(?::(?P<seed>\d+))?$")
_PROMPT_FIELDS = ("prompt", "question", "problem")
_SOLUTION_FIELDS = ("solution", "answer")
# How a prompt reaches the model: None renders it (the chat template when asked and present); "chat" and
# "plain" are prompts already rendered by `eval` (with or without the template), used as they are.
PROMPT_FORMATS = ("chat", "plain")


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a workload, in order, a canonical name, and the gold solutions where it has them.

    `solutions` (one per prompt) is what the loss-based ranking methods (`taylor`, `swap-nll`) and
    `select` measure the teacher-forced NLL of; None for a workload of prompts alone. `prompt_format`
    is None for prompts to render, or how they were rendered already (`PROMPT_FORMATS`): `chat` prompts
    are tokenized as they are, `plain` ones with the tokenizer's special tokens (a BOS), as `eval` does.
    Plain text is a `plain` prompt set of empty prompts.
    """

    name: str
    prompts: tuple[str, ...]
    solutions: tuple[str, ...] | None = None
    prompt_format: str | None = None

    @property
    def sha256(self) -> str:
        """Identifies the exact prompts: two stats files are comparable only if these match.

        A rendered set (plain text too, whose prompts are all empty) is identified by its solutions and format
        as well; a set to render keeps the hash of its prompts alone, as before rendered sets existed.
        """
        if self.prompt_format is None:
            return hashlib.sha256(json.dumps(list(self.prompts)).encode()).hexdigest()
        what = [list(self.prompts), list(self.solutions or ()), self.prompt_format]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()


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
        f"{m['name']}:{count}:{seed}",
        tuple(rows[i][0] for i in picked),
        tuple(rows[i][1] for i in picked),
        "plain" if m["name"] in TEXT_BUILTINS else None,
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
    prompts, solutions, formats = [], [], set()
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
        if not isinstance(row, dict):
            raise SurgeryError(f"workload {path} line {i}: not a JSON object; write one object per line")
        fmt = row.get("prompt_format")
        if isinstance(row.get("text"), str) and row["text"] and not any(f in row for f in _PROMPT_FIELDS):
            prompt, solution, fmt = "", row["text"], "plain"  # plain text: every token after the first is scored
        else:
            prompt = next((row[f] for f in _PROMPT_FIELDS if isinstance(row.get(f), str)), None)
            if not prompt:
                msg = f"workload {path} line {i}: no non-empty 'prompt', 'question' or 'text' string field"
                raise SurgeryError(msg)
            solution = next((row[f] for f in _SOLUTION_FIELDS if isinstance(row.get(f), str) and row[f]), None)
            if fmt is not None and fmt not in PROMPT_FORMATS:
                raise SurgeryError(
                    f"workload {path} line {i}: prompt_format {fmt!r} is not one of {', '.join(PROMPT_FORMATS)}; "
                    "drop it to have the prompt rendered"
                )
        prompts.append(prompt)
        solutions.append(solution)
        formats.add(fmt)
    if not prompts:
        raise SurgeryError(f"workload {path} is empty; it needs one JSON object with a 'prompt' per line")
    if len(formats) > 1:
        raise SurgeryError(
            f"workload {path} mixes prompts rendered in different ways (prompt_format {sorted(map(str, formats))}); "
            "use one kind of line per file"
        )
    # Gold solutions only when every line has one: a partial set would score a different workload.
    gold = tuple(solutions) if all(s is not None for s in solutions) else None
    return PromptSet(path.name, tuple(prompts), gold, formats.pop())  # type: ignore[arg-type]
