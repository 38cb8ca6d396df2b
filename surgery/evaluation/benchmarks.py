"""Math benchmarks: loading, seeded subsets, prompts, answer extraction and grading.

Two graders:
- `gsm8k`: the numeric answer, extracted and compared exactly as lm-eval-harness's gsm8k task does
  ("strict-match" on `#### N`, "flexible-extract" on the last number, then normalized string
  equality). Matching lm-eval exactly keeps our accuracies comparable with published ones.
- `math`: the last `\\boxed{}` in the output, judged equal to the gold answer by `math-verify`
  (symbolic equivalence: `\\frac{1}{2}` == `0.5`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from surgery.data import addition_rows, read_jsonl_gz, strip_calculator
from surgery.errors import SurgeryError

BENCHMARKS = ("gsm8k", "math500", "addition")
GRADERS = ("gsm8k", "math")
MAX_SHOTS = 8

# Ends a completion in the plain "Question: ... Answer:" format: the model starting the next
# question, or rambling into blank lines.
STOP_STRINGS: tuple[str, ...] = ("Question:", "\n\n\n")
# Prompt styles: surgery's (the instruction asking for the answer format, the chat template when the
# tokenizer has one) and lm-eval-harness's gsm8k task ("Question: ...\nAnswer:", no chat template,
# its stop strings), whose numbers are comparable with lm-eval's zero-shot gsm8k.
PROMPT_STYLES = ("surgery", "lm-eval")
LM_EVAL_STOP_STRINGS: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")

_INSTRUCTIONS = {
    "gsm8k": 'Please reason step by step, and finish with a final line of the form "#### <number>".',
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
}

# lm-eval-harness gsm8k.yaml, verbatim.
_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE_RES = tuple(re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$"))

_NUMBER_RE = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")

# Few-shot exemplars must be short (they are repeated in every prompt) and, for MATH, end in
# exactly one \boxed{} so that they teach the answer format the grader reads.
_MAX_EXEMPLAR_CHARS = 400
# math-verify's timeouts use signal.alarm, which only works in the main thread; elsewhere it
# raises ValueError, which would grade every answer wrong, so off the main thread we run unguarded.
_MATH_VERIFY_TIMEOUT_S = 5


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    id: stable across runs ("gsm8k-test-0017", "math500-<unique_id>", "<file name>:<line>").
    answer: the gold final answer. solution: the full gold solution, for teacher-forced NLL.
    """

    id: str
    question: str
    answer: str
    solution: str


@dataclass(frozen=True)
class Benchmark:
    """A named set of problems and the grader that scores them."""

    name: str
    grader: str
    problems: tuple[Problem, ...]

    @property
    def sha256(self) -> str:
        """Identifies the exact problems and gold answers: results are comparable only if these match."""
        rows = [[p.id, p.question, p.answer] for p in self.problems]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading


def gsm8k_gold(answer: str) -> str:
    # The number after "####"; commas removed so that it equals lm-eval's normalized reference.
    return answer.split("####")[-1].strip().replace(",", "")


def load_benchmark(spec: str) -> Benchmark:
    """Resolve a benchmark spec.

    Args:
        spec: `gsm8k` (GSM8K test, 1319 problems), `math500` (MATH-500, 500 problems), or a JSONL
            file with a `question` (or `problem`) and an `answer` per line, optionally `id` and
            `solution`.

    Returns:
        The benchmark.

    Raises:
        SurgeryError: unknown name, missing file, or a malformed or empty file.
    """
    if spec in BENCHMARKS:
        return _builtin(spec)
    path = Path(spec)
    if path.is_file():
        return _from_file(path)
    if path.exists():
        raise SurgeryError(f"benchmark {spec} is not a file; pass a JSONL file with question/answer fields")
    if path.suffix in (".jsonl", ".json", ".gz") or "/" in spec or "\\" in spec:
        raise SurgeryError(f"benchmark file {spec} does not exist; check the path")
    raise SurgeryError(
        f"unknown benchmark {spec!r}; use one of {', '.join(BENCHMARKS)}, or a JSONL file with question/answer fields"
    )


@functools.cache
def _builtin(name: str) -> Benchmark:
    # Cached: a Benchmark is immutable and a sweep asks for the same one once per K.
    if name == "gsm8k":
        rows = read_jsonl_gz("gsm8k-test.jsonl.gz")
        problems = tuple(
            Problem(f"gsm8k-test-{i:04d}", r["question"], gsm8k_gold(r["answer"]), strip_calculator(r["answer"]))
            for i, r in enumerate(rows)
        )
        return Benchmark("gsm8k", "gsm8k", problems)
    if name == "addition":
        rows = addition_rows("test")
        problems = tuple(
            Problem(f"addition-test-{i:03d}", r["question"], r["answer"], r["solution"]) for i, r in enumerate(rows)
        )
        return Benchmark("addition", "gsm8k", problems)
    rows = read_jsonl_gz("math500-test.jsonl.gz")
    problems = tuple(Problem(f"math500-{r['unique_id']}", r["problem"], r["answer"], r["solution"]) for r in rows)
    return Benchmark("math500", "math", problems)


def _from_file(path: Path) -> Benchmark:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SurgeryError(f"benchmark {path}: cannot read ({e}); pass a UTF-8 JSONL file") from None
    problems = []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            problems.append(_parse_row(path, lineno, line))
    if not problems:
        raise SurgeryError(f"benchmark {path} is empty; write one JSON object with question and answer per line")
    seen: dict[str, int] = {}
    for i, p in enumerate(problems):
        if p.id in seen:
            # Results are resumed by id, so a duplicate would silently skip a problem.
            raise SurgeryError(f"benchmark {path}: id {p.id!r} appears twice; give every problem a unique id")
        seen[p.id] = i
    numeric = all(_NUMBER_RE.fullmatch(normalize_number(p.answer)) for p in problems)
    return Benchmark(path.name, "gsm8k" if numeric else "math", tuple(problems))


def _parse_row(path: Path, lineno: int, line: str) -> Problem:
    where = f"benchmark {path} line {lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SurgeryError(f"{where}: not valid JSON ({e.msg}); write one object per line") from None
    if not isinstance(row, dict):
        raise SurgeryError(f"{where}: expected a JSON object with question and answer fields")
    question = _text_field(row, "question") or _text_field(row, "problem")
    if question is None:
        raise SurgeryError(f"{where}: no non-empty 'question' (or 'problem') string field")
    answer = _text_field(row, "answer")
    if answer is None:
        raise SurgeryError(f"{where}: no non-empty 'answer' string field")
    solution = _text_field(row, "solution")
    if "solution" in row and solution is None:
        raise SurgeryError(f"{where}: 'solution' must be a non-empty string; fix it or drop the field")
    if "####" in answer:
        # A GSM8K-style answer (full solution ending "#### N"): grade the final number only.
        solution = solution or strip_calculator(answer)
        answer = gsm8k_gold(answer)
    row_id = row.get("id")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        raise SurgeryError(f"{where}: 'id' must be a string or an integer")
    pid = str(row_id) if row_id is not None else f"{path.name}:{lineno}"
    return Problem(pid, question, answer, solution or answer)


def _text_field(row: dict, key: str) -> str | None:
    # Numbers are accepted for convenience ({"answer": 72}); booleans are not numbers here.
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


# ---------------------------------------------------------------------------------------------
# Subsets


def select_problems(bench: Benchmark, limit: int | None, seed: int) -> tuple[list[Problem], str | None]:
    """Pick a seeded random subset (the paper: limit 50, seed 42), kept in dataset order.

    Args:
        bench: the benchmark.
        limit: how many problems; None for all.
        seed: seeds `random.Random(seed).sample` over the problem indices.

    Returns:
        (problems, warning): the warning is set when `limit` exceeds the benchmark's size.

    Raises:
        SurgeryError: `limit` is not positive.
    """
    n = len(bench.problems)
    if limit is None:
        return list(bench.problems), None
    if limit <= 0:
        raise SurgeryError(f"--limit must be a positive integer, got {limit}; omit it to use all problems")
    if limit > n:
        return list(bench.problems), f"--limit {limit} is more than the {n} problems; using all {n}"
    picked = sorted(random.Random(seed).sample(range(n), limit))
    return [bench.problems[i] for i in picked], None


# ---------------------------------------------------------------------------------------------
# Prompts


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


@functools.cache
def _exemplar_pool(grader: str) -> tuple[tuple[str, str], ...]:
    """Candidate (question, solution) exemplars from the TRAIN split, in a fixed order.

    GSM8K: the train rows in file order. MATH: one per subject in turn, so that eight shots cover
    all seven subjects rather than eight algebra problems (the file is sorted by subject).
    """
    if grader == "gsm8k":
        rows = read_jsonl_gz("gsm8k-train.jsonl.gz")
        pool = [(r["question"], strip_calculator(r["answer"])) for r in rows]
        return tuple((q, s) for q, s in pool if len(s) <= _MAX_EXEMPLAR_CHARS)[: 4 * MAX_SHOTS]
    by_subject: dict[str, list[tuple[str, str]]] = {}
    for r in read_jsonl_gz("math-train.jsonl.gz"):
        s = r["solution"]
        if len(s) <= _MAX_EXEMPLAR_CHARS and s.count("\\boxed") == 1 and "[asy]" not in s + r["problem"]:
            by_subject.setdefault(r["type"], []).append((r["problem"], s))
    pool = []
    for rank in range(4):  # a few per subject is plenty: exclusion only ever drops one
        pool += [group[rank] for group in by_subject.values() if rank < len(group)]
    return tuple(pool)


def _exemplars(question: str, grader: str, shots: int) -> list[tuple[str, str]]:
    # Skip an exemplar equal to the question itself (possible with a custom benchmark), so a
    # prompt never contains its own answer.
    q = _norm(question)
    return [(eq, es) for eq, es in _exemplar_pool(grader) if _norm(eq) != q][:shots]


def _check_prompt_args(grader: str, shots: int) -> None:
    if grader not in GRADERS:
        raise SurgeryError(f"unknown grader {grader!r}; use one of {', '.join(GRADERS)}")
    if isinstance(shots, bool) or not isinstance(shots, int) or not 0 <= shots <= MAX_SHOTS:
        raise SurgeryError(f"--shots must be an integer from 0 to {MAX_SHOTS}, got {shots!r}")


def check_prompt_style(prompt: str) -> None:
    """Refuse a `--prompt` that is not one of `PROMPT_STYLES` (`eval` and `solutions`)."""
    if prompt not in PROMPT_STYLES:
        raise SurgeryError(f"--prompt {prompt!r} is not one of {', '.join(PROMPT_STYLES)}")


def _user_turn(question: str, grader: str, style: str = "surgery") -> str:
    return question.strip() if style == "lm-eval" else f"{question.strip()}\n{_INSTRUCTIONS[grader]}"


def prompt_messages(problem: Problem, grader: str, shots: int) -> list[dict[str, str]]:
    """Chat messages for a problem: `shots` worked train examples, then the question.

    Args:
        problem: the problem to ask.
        grader: `gsm8k` (ask for a final `#### N` line) or `math` (ask for `\\boxed{}`).
        shots: 0 to 8 fixed exemplars from the train split, as user/assistant turns.

    Returns:
        Messages with `role` and `content`; every user turn carries the instruction.

    Raises:
        SurgeryError: unknown grader or `shots` out of range.
    """
    _check_prompt_args(grader, shots)
    messages = []
    for q, s in _exemplars(problem.question, grader, shots):
        messages.append({"role": "user", "content": _user_turn(q, grader)})
        messages.append({"role": "assistant", "content": s.strip()})
    messages.append({"role": "user", "content": _user_turn(problem.question, grader)})
    return messages


def prompt_text(problem: Problem, grader: str, shots: int, style: str = "surgery") -> str:
    """The same prompt as `prompt_messages`, for models without a chat template.

    Args:
        problem: the problem to ask.
        grader: `gsm8k` or `math`.
        shots: 0 to 8 fixed exemplars from the train split.
        style: `surgery` (each question followed by the answer-format instruction) or `lm-eval`
            (lm-eval-harness's gsm8k `doc_to_text`, "Question: {question}\nAnswer:", no instruction).

    Returns:
        "Question: ...\\nAnswer: ..." blocks separated by blank lines, ending with "Answer:".

    Raises:
        SurgeryError: unknown grader or `shots` out of range.
    """
    _check_prompt_args(grader, shots)
    blocks = [
        f"Question: {_user_turn(q, grader, style)}\nAnswer: {s.strip()}"
        for q, s in _exemplars(problem.question, grader, shots)
    ]
    blocks.append(f"Question: {_user_turn(problem.question, grader, style)}\nAnswer:")
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# Extraction


def extract_gsm8k_strict(text: str) -> str | None:
    """lm-eval-harness "strict-match": the number after the first `#### `.

    Args:
        text: a model output.

    Returns:
        The matched number text, or None.
    """
    m = _STRICT_RE.search(text)
    return m.group(1).strip() if m else None


def extract_gsm8k_flexible(text: str) -> str | None:
    """lm-eval-harness "flexible-extract": the last number-like run in the text.

    Args:
        text: a model output.

    Returns:
        The last match (it may carry `$`, `,` or a trailing `.`, which `normalize_number` removes),
        or None.
    """
    matches = _FLEXIBLE_RE.findall(text)
    if not matches:
        return None
    return next(g for g in matches[-1] if g).strip()


def normalize_number(text: str) -> str:
    """lm-eval-harness gsm8k normalization: drop `,` `$`, everything up to `#### `, one trailing `.`.

    Args:
        text: an extracted answer or a gold answer.

    Returns:
        The normalized text, stripped (lm-eval's regex filter strips its match).
    """
    for pattern in _IGNORE_RES:
        text = pattern.sub("", text)
    return text.strip()


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included.

    Args:
        text: a model output.

    Returns:
        The content (possibly ""), or None when there is no box or the last one never closes.
    """
    starts = list(_BOXED_RE.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    depth = 1
    i = begin
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character, e.g. the set braces in \{1, 2\}, does not nest
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None


# ---------------------------------------------------------------------------------------------
# Grading


def grade(grader: str, output: str, gold: str) -> dict:
    """Grade one model output against the gold answer.

    Args:
        grader: `gsm8k` or `math`.
        output: the generated text.
        gold: the gold final answer (`Problem.answer`).

    Returns:
        gsm8k: {"extracted", "strict", "flexible", "correct"}, where "correct" is the flexible
        verdict. math: {"extracted", "correct"}. "extracted" is None when nothing was found.

    Raises:
        SurgeryError: unknown grader.
    """
    if grader == "gsm8k":
        return _grade_gsm8k(output, gold)
    if grader == "math":
        boxed = extract_boxed(output)
        return {"extracted": boxed, "correct": bool(boxed and boxed.strip()) and _math_equal(gold, boxed)}
    raise SurgeryError(f"unknown grader {grader!r}; use one of {', '.join(GRADERS)}")


def _grade_gsm8k(output: str, gold: str) -> dict:
    # lm-eval compares normalized strings exactly: "72.0" does not match "72", and neither do we.
    ref = normalize_number(gold)
    strict, flexible = extract_gsm8k_strict(output), extract_gsm8k_flexible(output)
    strict_ok = strict is not None and normalize_number(strict) == ref
    flexible_ok = flexible is not None and normalize_number(flexible) == ref
    return {"extracted": flexible, "strict": strict_ok, "flexible": flexible_ok, "correct": flexible_ok}


def _math_equal(gold: str, answer: str) -> bool:
    from math_verify import parse, verify  # slow import (sympy); only the math grader needs it
    from math_verify.errors import TimeoutException

    timeout = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(
            verify(
                parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout),
                parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout),
                timeout_seconds=timeout,
            )
        )
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        # Weird model output must cost the point, never the evaluation.
        return False
