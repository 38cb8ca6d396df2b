"""Benchmarks: loading, subsets, prompts, and grading real-looking outputs the way lm-eval and math-verify do."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from surgery import SurgeryError
from surgery.analysis.workloads import load_workload
from surgery.data import read_jsonl_gz, strip_calculator
from surgery.evaluation.benchmarks import (
    BENCHMARKS,
    STOP_STRINGS,
    Benchmark,
    Problem,
    extract_boxed,
    extract_gsm8k_flexible,
    extract_gsm8k_strict,
    grade,
    load_benchmark,
    normalize_number,
    prompt_messages,
    prompt_text,
    select_problems,
)

# ---------------------------------------------------------------------------------------------
# GSM8K grading: (output, gold, strict extract, flexible extract, strict verdict, flexible verdict).
# The expectations are lm-eval-harness's gsm8k task: regex filters, then exact string match after
# its regexes_to_ignore. Where that is harsh ("72.0" != "72"), we are harsh too.

GSM8K_CASES = [
    # Well-formed chain of thought ending in the requested "#### N" line.
    (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72",
        "72",
        "72",
        "72",
        True,
        True,
    ),
    (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day.\n#### 18",
        "18",
        "18",
        "18",
        True,
        True,
    ),
    # "The answer is N" without the marker: only the flexible extract finds it.
    ("The answer is 72.", "72", None, "72.", False, True),
    ("The answer is 72", "72", None, "72", False, True),
    ("The answer is 72\n", "72", None, "72", False, True),
    ("#### 72\nThe answer is 72", "72", "72", "72", True, True),
    # A dollar sign after the marker defeats strict-match; normalization removes it for flexible.
    ("So she makes $18 every day.\n#### $18", "18", None, "$18", False, True),
    ("Total: $1,234.", "1234", None, "$1,234.", False, True),
    ("#### 1,234", "1234", "1,234", "1,234", True, True),
    ("#### 1,234.\n", "1234", "1,234.", "1,234.", True, True),
    ("The answer is 1,000,000.", "1000000", None, "1,000,000.", False, True),
    # Negative numbers.
    ("The temperature dropped to -5 degrees.\n#### -5", "-5", "-5", "-5", True, True),
    ("He lost 5 dollars, so the change is -5.", "-5", None, "-5.", False, True),
    ("#### -3", "-3", "-3", "-3", True, True),
    ("The answer is -3", "3", None, "-3", False, False),
    # No answer at all.
    ("I don't know.", "72", None, None, False, False),
    ("", "72", None, None, False, False),
    ("#### .", "1", ".", None, False, False),
    # A single digit (the second alternative of the flexible regex).
    ("She has 3 apples", "3", None, "3", False, True),
    ("The answer is 7", "7", None, "7", False, True),
    # Several numbers: flexible takes the LAST, strict the FIRST "####".
    ("First 12 + 30 = 42, then 42 * 2 = 84. So the answer is 84", "84", None, "84", False, True),
    ("So the answer is 84. Double check: 42 * 2 = 84 in 3 steps", "84", None, "3", False, False),
    ("#### 18\n#### 20", "18", "18", "20", True, False),
    ("#### 72\n\nQuestion: Tom has 3 cats", "72", "72", "3", True, False),
    ("The answer is 3-2=1", "1", None, "1", False, True),
    # lm-eval compares strings: no numeric equality.
    ("#### 72.0", "72", "72.0", "72.0", False, False),
    ("He paid $10.00 in total.", "10", None, "$10.00", False, False),
    ("He paid $10.00 in total.\n#### 10", "10", "10", "10", True, True),
    ("The answer is .5", "0.5", None, ".5", False, False),
    ("The answer is 2.5 hours.", "2.5", None, "2.5", False, True),
    # An ellipsis is "number-like" to the flexible regex ([$0-9.,]{2,}) and wins as the last match.
    ("The answer is 42. Hmm...", "42", None, "...", False, False),
    # A space as thousands separator splits the number.
    ("The answer is 1 000", "1000", None, "000", False, False),
    # No space after the marker: strict-match needs "#### ".
    ("####72", "72", None, "72", False, True),
    ("Step 1: 5 + 5 = 10.\nStep 2: 10 * 2 = 20.\n#### 20.", "20", "20.", "20.", True, True),
    ("The answer is \\boxed{72}", "72", None, "72", False, True),
    ("$ 18", "18", None, "18", False, True),
    ("Answer: 10%", "10", None, "10", False, True),
]


@pytest.mark.parametrize(("output", "gold", "strict", "flexible", "strict_ok", "flexible_ok"), GSM8K_CASES)
def test_gsm8k_grading(output: str, gold: str, strict, flexible, strict_ok: bool, flexible_ok: bool) -> None:
    assert extract_gsm8k_strict(output) == strict
    assert extract_gsm8k_flexible(output) == flexible
    verdict = grade("gsm8k", output, gold)
    assert verdict == {"extracted": flexible, "strict": strict_ok, "flexible": flexible_ok, "correct": flexible_ok}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,234.", "1234"),
        ("1,234", "1234"),
        ("-5.", "-5"),
        ("72.0", "72.0"),
        ("20..", "20."),  # one trailing period only, as lm-eval's "\.$"
        ("Natalia sold 72 clips.\n#### 72", "72"),
        (" 18 ", "18"),
    ],
)
def test_normalize_number(text: str, expected: str) -> None:
    assert normalize_number(text) == expected


def test_strip_calculator() -> None:
    assert strip_calculator("Natalia sold 48/2 = <<48/2=24>>24 clips.") == "Natalia sold 48/2 = 24 clips."
    assert strip_calculator("no annotations") == "no annotations"


# ---------------------------------------------------------------------------------------------
# MATH grading: (output, gold, extracted \boxed{} content, verdict). The verdicts are what
# math-verify 0.9 really returns; the surprising ones are commented.

MATH_CASES = [
    ("So $a+b=-3+3=\\boxed{0}$.", "0", "0", True),
    # Symbolic equivalence: 1/2 == 0.5 in either direction (math-verify returns True).
    ("The probability is $\\boxed{\\frac{1}{2}}$.", "0.5", "\\frac{1}{2}", True),
    ("The probability is $\\boxed{0.5}$.", "\\frac{1}{2}", "0.5", True),
    ("$\\boxed{\\dfrac{16}{4}}$", "4", "\\dfrac{16}{4}", True),
    # Thousands separators: a comma is understood, a LaTeX thin space is not (parsed as 1*0).
    ("There are $\\boxed{1,000}$ ways.", "1000", "1,000", True),
    ("There are $\\boxed{1{,}000}$ ways.", "1000", "1{,}000", True),
    ("There are $\\boxed{1\\,000}$ ways.", "1000", "1\\,000", False),
    # Nested braces.
    ("Thus $\\sin 60^\\circ = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", True),
    ("$\\boxed{\\frac{\\sqrt3}2}$", "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}2", True),
    ("$\\boxed{2\\sqrt{2}}$", "\\sqrt{8}", "2\\sqrt{2}", True),
    ("The set is $\\boxed{\\{1, 2\\}}$.", "\\{2,1\\}", "\\{1, 2\\}", True),
    (
        "The polar form is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        True,
    ),
    ("$\\boxed{(3, \\pi/2)}$", "\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    ("$\\boxed{(3, \\frac{\\pi}{4})}$", "\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{4})", False),
    (
        "$$\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}$$",
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        True,
    ),
    # Empty box and no box.
    ("The answer is $\\boxed{}$.", "5", "", False),
    ("The answer is 5.", "5", None, False),
    ("", "5", None, False),
    # Several boxes: the last wins.
    ("First $\\boxed{3}$; no wait, it is $\\boxed{4}$.", "4", "4", True),
    ("First $\\boxed{3}$; no wait, it is $\\boxed{4}$.", "3", "4", False),
    # A truncated final box is unbalanced: no answer, even though an earlier box closed.
    ("Maybe $\\boxed{2}$. Actually $\\boxed{\\frac{1", "2", None, False),
    ("$\\boxed{\\frac{1}{2}", "\\frac{1}{2}", None, False),
    ("\\fbox{7}", "7", "7", True),
    ("$\\boxed {5}$", "5", "5", True),
    # Trailing period: math-verify cannot parse "3." (it returns only the raw string), so it is wrong,
    # unlike the GSM8K grader, which drops one trailing period.
    ("$\\boxed{3.}$", "3", "3.", False),
    ("$\\boxed{3.0}$", "3", "3.0", True),
    ("$\\boxed{-3}$", "-3", "-3", True),
    ("$\\boxed{-3}$", "3", "-3", False),
    # Lenient: an equation's right-hand side, units, degrees, dollars and even a percent sign
    # (72% vs 72 is accepted: math-verify forgives a missing or extra %).
    ("$\\boxed{x = 5}$", "5", "x = 5", True),
    ("$\\boxed{12 \\text{ cm}^2}$", "12", "12 \\text{ cm}^2", True),
    ("$\\boxed{10^\\circ}$", "10", "10^\\circ", True),
    ("$\\boxed{\\$5.00}$", "5", "\\$5.00", True),
    ("$\\boxed{72\\%}$", "72", "72\\%", True),
    # Multiple-choice letters and text.
    ("$\\boxed{\\text{(C)}}$", "\\text{(C)}", "\\text{(C)}", True),
    ("$\\boxed{C}$", "\\text{(C)}", "C", True),
    ("$\\boxed{\\text{Evelyn}}$", "\\text{Evelyn}", "\\text{Evelyn}", True),
    ("$\\boxed{six}$", "6", "six", False),
    # Unordered answer lists compare as sets.
    (
        "$\\boxed{-\\sqrt{2} + i, -\\sqrt{2}, -\\sqrt{2} - i}$",
        "-\\sqrt{2}, -\\sqrt{2} + i, -\\sqrt{2} - i",
        "-\\sqrt{2} + i, -\\sqrt{2}, -\\sqrt{2} - i",
        True,
    ),
    ("$\\boxed{3 \\text{ and } 4}$", "3", "3 \\text{ and } 4", False),
    # Intervals keep their brackets.
    ("$y \\in \\boxed{[0,\\pi]}$", "[0,\\pi]", "[0,\\pi]", True),
    ("$\\boxed{(2, 5)}$", "[2,5)", "(2, 5)", False),
    # Algebraic equivalence.
    ("$\\boxed{(x+1)^2}$", "x^2+2x+1", "(x+1)^2", True),
    # Decimals are rounded to 6 places before comparing: 0.333 is not 1/3, 0.333333 is.
    ("$\\boxed{0.333}$", "\\frac13", "0.333", False),
    ("$\\boxed{0.333333}$", "\\frac13", "0.333333", True),
    ("$\\boxed{3.14}$", "\\pi", "3.14", False),
    ("$\\boxed{14 \\pmod{17}}$", "14", "14 \\pmod{17}", False),
    # Garbage must cost the point, not raise.
    ("$\\boxed{)))(((}$", "5", ")))(((", False),
    ("$\\boxed{\\frac{}{}}$", "5", "\\frac{}{}", False),
]


@pytest.mark.parametrize(("output", "gold", "extracted", "correct"), MATH_CASES)
def test_math_grading(output: str, gold: str, extracted: str | None, correct: bool) -> None:
    assert extract_boxed(output) == extracted
    assert grade("math", output, gold) == {"extracted": extracted, "correct": correct}


def test_math_grading_off_the_main_thread() -> None:
    # math-verify's signal-based timeout fails off the main thread; we must still grade there.
    results = []
    thread = threading.Thread(target=lambda: results.append(grade("math", "$\\boxed{\\frac{1}{2}}$", "0.5")))
    thread.start()
    thread.join()
    assert results == [{"extracted": "\\frac{1}{2}", "correct": True}]


def test_unknown_grader() -> None:
    with pytest.raises(SurgeryError, match="unknown grader 'mmlu'"):
        grade("mmlu", "42", "42")


# ---------------------------------------------------------------------------------------------
# Built-in benchmarks


def test_builtin_benchmarks() -> None:
    gsm8k, math500 = load_benchmark("gsm8k"), load_benchmark("math500")
    assert BENCHMARKS == ("gsm8k", "math500", "addition")
    assert (gsm8k.name, gsm8k.grader, len(gsm8k.problems)) == ("gsm8k", "gsm8k", 1319)
    assert (math500.name, math500.grader, len(math500.problems)) == ("math500", "math", 500)
    for bench in (gsm8k, math500):
        assert len({p.id for p in bench.problems}) == len(bench.problems)
        assert all(p.question and p.answer and p.solution for p in bench.problems)
    raw = read_jsonl_gz("gsm8k-test.jsonl.gz")[0]
    first = gsm8k.problems[0]
    assert first.id == "gsm8k-test-0000" and first.question == raw["question"]
    assert first.answer == raw["answer"].split("#### ")[-1] == "18"
    assert "<<" not in first.solution and first.solution.endswith("#### 18")
    # Gold answers with thousands separators lose the comma; all are plain integers.
    assert all(re.fullmatch(r"-?\d+", p.answer) for p in gsm8k.problems)
    raw_math = read_jsonl_gz("math500-test.jsonl.gz")[0]
    assert math500.problems[0] == Problem(
        f"math500-{raw_math['unique_id']}", raw_math["problem"], raw_math["answer"], raw_math["solution"]
    )
    assert gsm8k.sha256 != math500.sha256 and len(gsm8k.sha256) == 64
    assert load_benchmark("gsm8k").sha256 == gsm8k.sha256


def test_addition_benchmark_is_disjoint_from_its_train_split() -> None:
    bench = load_benchmark("addition")
    assert (bench.grader, len(bench.problems)) == ("gsm8k", 500)
    first = bench.problems[0]
    a, b = (int(x) for x in re.findall(r"\d+", first.question))
    assert first.answer == str(a + b) and first.solution.endswith(f"#### {a + b}")
    train = load_workload(f"addition-train:{7600}")
    assert not {p.question for p in bench.problems} & set(train.prompts)
    assert len(set(train.prompts)) == 7600


def test_gold_solutions_grade_correct() -> None:
    # The gold solution is a perfect model output: each grader must score it correct.
    for name in BENCHMARKS:
        bench = load_benchmark(name)
        problems, _ = select_problems(bench, 20, 0)
        assert all(grade(bench.grader, p.solution, p.answer)["correct"] for p in problems), name


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mmlu", "unknown benchmark 'mmlu'; use one of gsm8k, math500, addition, or a JSONL file"),
        ("GSM8K", "unknown benchmark 'GSM8K'"),
        ("nope.jsonl", "benchmark file nope.jsonl does not exist"),
        ("data/nope", "does not exist"),
    ],
)
def test_unknown_benchmark(spec: str, message: str) -> None:
    with pytest.raises(SurgeryError, match=re.escape(message)):
        load_benchmark(spec)


def test_directory_is_not_a_benchmark(tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match="is not a file"):
        load_benchmark(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Subsets


def test_select_problems_paper_setting() -> None:
    bench = load_benchmark("math500")
    a, warning = select_problems(bench, 50, 42)
    b, _ = select_problems(bench, 50, 42)
    assert warning is None and a == b and len(a) == 50 and len({p.id for p in a}) == 50
    position = {p.id: i for i, p in enumerate(bench.problems)}
    indices = [position[p.id] for p in a]
    assert indices == sorted(indices)  # dataset order
    assert [p.id for p in select_problems(bench, 50, 43)[0]] != [p.id for p in a]


def test_select_problems_all_and_too_many() -> None:
    bench = _bench(3)
    assert select_problems(bench, None, 42) == (list(bench.problems), None)
    assert select_problems(bench, 3, 42) == (list(bench.problems), None)
    problems, warning = select_problems(bench, 10, 42)
    assert problems == list(bench.problems)
    assert warning == "--limit 10 is more than the 3 problems; using all 3"


@pytest.mark.parametrize("limit", [0, -1])
def test_select_problems_bad_limit(limit: int) -> None:
    with pytest.raises(SurgeryError, match="--limit must be a positive integer"):
        select_problems(_bench(3), limit, 42)


def _bench(n: int) -> Benchmark:
    return Benchmark("t", "gsm8k", tuple(Problem(f"t:{i}", f"q{i}", str(i), str(i)) for i in range(n)))


# ---------------------------------------------------------------------------------------------
# Custom JSONL


def _write(tmp_path: Path, content: str, name: str = "bench.jsonl") -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


def test_custom_jsonl(tmp_path: Path) -> None:
    rows = [
        {"question": "What is 2 + 3?", "answer": "5"},
        {"problem": "What is 10 * 10?", "answer": "1,000", "id": "big", "solution": "10 * 10 = 100, oops"},
        {"question": "How many?", "answer": 7},
        {"question": "GSM8K style", "answer": "2 * 3 = <<2*3=6>>6\n#### 6"},
    ]
    path = _write(
        tmp_path, "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n" + json.dumps(rows[3])
    )
    bench = load_benchmark(path)
    assert bench.name == "bench.jsonl" and bench.grader == "gsm8k"
    assert bench.problems == (
        Problem("bench.jsonl:1", "What is 2 + 3?", "5", "5"),
        Problem("big", "What is 10 * 10?", "1,000", "10 * 10 = 100, oops"),
        Problem("bench.jsonl:4", "How many?", "7", "7"),  # line 3 is blank; ids keep file line numbers
        Problem("bench.jsonl:5", "GSM8K style", "6", "2 * 3 = 6\n#### 6"),
    )
    assert grade(bench.grader, "so 1,000", bench.problems[1].answer)["correct"]


@pytest.mark.parametrize(
    ("answers", "grader"),
    [
        (["5", "-3", "1,234", "2.5", "$10"], "gsm8k"),
        (["5", "\\frac{1}{2}"], "math"),
        (["5", "x^2"], "math"),
        (["(C)"], "math"),
    ],
)
def test_custom_grader_choice(tmp_path: Path, answers: list[str], grader: str) -> None:
    path = _write(
        tmp_path, "".join(json.dumps({"question": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(answers))
    )
    assert load_benchmark(path).grader == grader


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("\n  \n", "is empty"),
        ('{"question": "a", "answer": "1"}\n{oops\n', "line 2: not valid JSON"),
        ('{"question": "a", "answer": "1"}\n\n{"question": "b"}\n', "line 3: no non-empty 'answer'"),
        ('{"answer": "1"}\n', "line 1: no non-empty 'question' (or 'problem')"),
        ('{"question": "", "answer": "1"}\n', "line 1: no non-empty 'question'"),
        ('["a", "1"]\n', "line 1: expected a JSON object"),
        ('{"question": "a", "answer": "1", "solution": ""}\n', "line 1: 'solution' must be a non-empty string"),
        ('{"question": "a", "answer": "1", "id": [1]}\n', "line 1: 'id' must be a string or an integer"),
        (
            '{"question": "a", "answer": "1", "id": 1}\n{"question": "b", "answer": "2", "id": "1"}\n',
            "id '1' appears twice",
        ),
    ],
)
def test_bad_custom_files(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(SurgeryError, match=re.escape(message)):
        load_benchmark(_write(tmp_path, content))


# ---------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize(
    ("name", "train", "field"), [("gsm8k", "gsm8k-train", "question"), ("math500", "math-train", "problem")]
)
def test_prompt_messages(name: str, train: str, field: str) -> None:
    bench = load_benchmark(name)
    problem = bench.problems[7]
    zero = prompt_messages(problem, bench.grader, 0)
    assert len(zero) == 1 and zero[0]["role"] == "user" and zero[0]["content"].startswith(problem.question)
    instruction = "#### <number>" if bench.grader == "gsm8k" else "put your final answer within \\boxed{}"
    assert instruction in zero[0]["content"]

    eight = prompt_messages(problem, bench.grader, 8)
    assert [m["role"] for m in eight] == ["user", "assistant"] * 8 + ["user"]
    assert eight[-1] == zero[0]
    train_questions = {r[field].strip() for r in read_jsonl_gz(f"{train}.jsonl.gz")}
    test_questions = {p.question for p in bench.problems}
    for user, assistant in zip(eight[0:-1:2], eight[1:-1:2], strict=True):
        question = user["content"].rsplit("\n", 1)[0]  # the instruction is the last line
        assert question in train_questions and question not in test_questions
        assert "<<" not in assistant["content"]
        if bench.grader == "gsm8k":
            assert extract_gsm8k_strict(assistant["content"]) is not None
        else:
            assert extract_boxed(assistant["content"])
    # Fixed exemplars: the same for every problem.
    assert prompt_messages(bench.problems[8], bench.grader, 8)[:-1] == eight[:-1]
    assert prompt_messages(problem, bench.grader, 3) == eight[:6] + eight[-1:]


def test_exemplars_never_contain_the_question(tmp_path: Path) -> None:
    # A custom benchmark may reuse a train question: that exemplar is skipped for it.
    first = read_jsonl_gz("gsm8k-train.jsonl.gz")[0]
    path = _write(tmp_path, json.dumps({"question": first["question"], "answer": "72"}) + "\n")
    problem = load_benchmark(path).problems[0]
    messages = prompt_messages(problem, "gsm8k", 8)
    assert len(messages) == 17
    assert sum(first["question"] in m["content"] for m in messages) == 1


@pytest.mark.parametrize("name", BENCHMARKS)
def test_prompt_text(name: str) -> None:
    bench = load_benchmark(name)
    problem = bench.problems[0]
    zero = prompt_text(problem, bench.grader, 0)
    assert zero.startswith(f"Question: {problem.question}") and zero.endswith("\nAnswer:")
    assert zero.count("Question:") == 1
    eight = prompt_text(problem, bench.grader, 8)
    assert eight.endswith(zero) and eight.count("\nAnswer:") == 9 and eight.endswith("Answer:")
    messages = prompt_messages(problem, bench.grader, 8)
    # The same content as the chat form.
    for m in messages:
        assert m["content"] in eight
    assert "Question:" in STOP_STRINGS


@pytest.mark.parametrize("shots", [-1, 9, 2.0, True])
def test_bad_shots(shots) -> None:
    problem = Problem("x", "q", "1", "1")
    with pytest.raises(SurgeryError, match="--shots must be an integer from 0 to 8"):
        prompt_messages(problem, "gsm8k", shots)
    with pytest.raises(SurgeryError, match="--shots"):
        prompt_text(problem, "math", shots)
