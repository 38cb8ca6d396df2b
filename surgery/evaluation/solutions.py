"""On-policy solutions (`surgery solutions`): a model's own correct answers, written as a workload.

Gold solutions (GSM8K's worked answers) are not how a model writes: their NLL also measures how well it
imitates someone else's style. The model's own greedy answers that the gold answers grade correct are the task
done its way, so the loss on the SOURCE's correct answers ("make the target answer as the source does") is the
loss that should follow accuracy.

`solutions` answers a benchmark's (or a gold workload's) problems exactly as `eval` does, through its runner
(greedy, batched, resumable records in `OUT.eval/`, an eval results folder), grades them, and writes one line per
correct answer: `prompt` (the text eval rendered), `solution` (the answer eval recorded), `prompt_format`, `id` and
`gold`. `load_workload` reads that file as a rendered workload: `taylor`, `swap-nll` and `select --metric nll` use
its prompts as they are.

`source_solutions` does the same inside surgery's cache (`solutions/KEY/`, KEY the sha256 of the model, the
problems and the settings), for `analyze --solutions source` and `select --solutions source`: a rerun reuses it.

The answer is the text eval records: decoded without special tokens and cut at the first stop string. Its NLL
after the prompt scores the tokens the model chose before it stopped; the stop itself (EOS, or the next
"Question:" of a plain prompt) is not scored, as it is not for a gold solution. The text is tokenized again, so a
tokenizer that does not round-trip its own output may score slightly other tokens than it generated.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from surgery.analysis.ranking import get_method, methods_that_need
from surgery.analysis.workloads import BUILTINS, TEXT_BUILTINS, PromptSet, load_workload, require_solutions
from surgery.checkpoints.cache import cache_file, read_entry
from surgery.checkpoints.folder import Checkpoint, open_checkpoint
from surgery.checkpoints.loading import check_generation_options, load_tokenizer, with_model
from surgery.checkpoints.options import ModelOptions
from surgery.errors import SurgeryError
from surgery.evaluation.benchmarks import (
    BENCHMARKS,
    Benchmark,
    Problem,
    check_prompt_style,
    extract_boxed,
    gsm8k_gold,
    load_benchmark,
    prompt_messages,
    select_problems,
)
from surgery.evaluation.runner import RECORDS, SUMMARY, eval_settings, evaluate_loaded, problem_ids_sha256, read_records
from surgery.evaluation.summary import EvalSummary
from surgery.fileio import check_new_file, write_atomic

# The models `--solutions` can take the answers of.
SOLVERS = ("source",)
# The layout of a cache entry (`source_solutions`); a change makes new keys, so old entries are never misread.
_CACHE_LAYOUT = 1


@dataclass(frozen=True)
class SolutionsResult:
    """What `solutions` (or `source_solutions`) wrote.

    Attributes:
        out: the workload written, one line per answer graded correct.
        records: the eval results folder the answers were generated and graded in (records, settings, summary).
        summary: that evaluation's summary: how many problems, how many correct, the settings used.
    """

    out: Path
    records: Path
    summary: EvalSummary

    @property
    def prompt_format(self) -> str:
        """`chat` or `plain`: how eval rendered the prompts (the `prompt_format` of every line of `out`)."""
        return "chat" if self.summary.settings.chat else "plain"


def workload_benchmark(prompts: PromptSet, what: str, *, answers: bool) -> Benchmark:
    """A workload's problems as a benchmark that `eval` renders and grades: `select`'s validation problems, and
    the problems `solutions` answers.

    Each problem asks the workload's prompt, with its gold solution; with `answers`, also the final answer in
    that solution (GSM8K's `#### N`, else the last `\\boxed{}`), which grading needs. The grader is GSM8K's when
    every solution has a `#### N` line, else MATH's.

    Args:
        prompts: a workload to render (not one already rendered, nor plain text).
        what: what needs the problems, for messages (`"--metric accuracy"`, `"surgery solutions"`).
        answers: whether every problem must carry a final answer.

    Raises:
        SurgeryError: rendered prompts or plain text, no gold solutions, or (with `answers`) a solution
            without a final answer.
    """
    if prompts.prompt_format is not None:
        held = "plain text" if not any(prompts.prompts) else f"prompts already rendered ({prompts.prompt_format})"
        raise SurgeryError(
            f"{what} answers problems, and workload {prompts.name} holds {held}; "
            "pass the problems themselves, e.g. gsm8k-train:64 or a JSONL with question and answer"
        )
    solutions = require_solutions(prompts, what)
    problems = []
    for i, (question, solution) in enumerate(zip(prompts.prompts, solutions, strict=True)):
        answer = ""
        if answers:
            answer = (gsm8k_gold(solution) if "####" in solution else "") or extract_boxed(solution) or ""
            if not answer:
                raise SurgeryError(
                    f"{what} grades final answers, and problem {i + 1} of workload {prompts.name} has none "
                    "(GSM8K's '#### N' or a \\boxed{} answer); end every solution with one, or use another workload"
                )
        problems.append(Problem(f"{prompts.name}:{i}", question, answer, solution))
    grader = "gsm8k" if all("####" in p.solution for p in problems) else "math"
    return Benchmark(prompts.name, grader, tuple(problems))


def solution_problems(spec: str, what: str, *, benchmarks: bool = True) -> Benchmark:
    """The problems `solutions` answers, with their gold answers.

    Args:
        spec: a benchmark as `eval -b` takes it (`gsm8k`, `math500`, `addition`, a JSONL with question and
            answer) or a workload with gold solutions (`gsm8k-train:N[:SEED]`, `math-train:N`,
            `addition-train:N`, a JSONL with prompt and solution). A JSONL file is read as a benchmark when it
            is one, else as a workload.
        what: what needs them, for messages.
        benchmarks: whether the built-in benchmarks are taken. Not for `--solutions source`: they are the test
            problems `eval` scores, and modules ranked or K chosen on them would be chosen on the test.

    Raises:
        SurgeryError: neither a benchmark nor a workload, a built-in benchmark where `benchmarks` is false, or a
            workload without final answers.
    """
    if spec in BENCHMARKS:
        if not benchmarks:
            raise SurgeryError(
                f"{what} answers the problems of a workload, and {spec} is an evaluation benchmark (the test "
                "problems eval scores); rank and choose K on train problems, e.g. gsm8k-train:64"
            )
        return load_benchmark(spec)
    if Path(spec).is_file():
        try:
            return load_benchmark(spec)
        except SurgeryError as as_benchmark:
            try:
                prompts = load_workload(spec)
            except SurgeryError:
                raise as_benchmark from None
        return workload_benchmark(prompts, what, answers=True)
    if spec.split(":", 1)[0] in BUILTINS:
        return workload_benchmark(load_workload(spec), what, answers=True)
    raise SurgeryError(
        f"{spec!r} is no file, benchmark ({', '.join(BENCHMARKS)}) or built-in workload "
        f"({', '.join(f'{n}:N' for n in BUILTINS if n not in TEXT_BUILTINS)}); check the name or the path"
    )


def solutions(
    model: str | Path,
    workload: str,
    out: str | Path,
    *,
    limit: int | None = None,
    seed: int = 42,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    shots: int = 0,
    prompt: str = "surgery",
    max_memory: str | None = None,
    options: ModelOptions | None = None,
    overwrite: bool = False,
) -> SolutionsResult:
    """Answer `workload`'s problems with `model` as `eval` does, and write its correct answers as a workload.

    The answers are generated and graded in an eval results folder beside `out`, `OUT.eval/`: a rerun with the
    same settings resumes there (an interrupted run loses at most a batch), with other settings it is refused.

    Args:
        model: checkpoint folder.
        workload: the problems (see `solution_problems`): a benchmark, or a workload with gold solutions.
        out: the workload to write (JSONL): one line per correct answer, the prompt exactly as eval rendered it.
        limit, seed: answer a seeded random subset of `limit` problems, as `eval` picks it.
        max_new_tokens, batch_size: greedy decoding budget and batch size.
        shots, prompt: exemplars and prompt style, as `eval` takes them (`prompt="lm-eval"` is plain text).
        max_memory: as in `eval`: weights beyond this RAM budget are read from disk (accelerate).
        options: how the model is loaded and prompted (dtype, chat template, device, progress).
        overwrite: replace an existing `out`.

    Returns:
        What was written, with the evaluation's summary (how many of how many were correct).

    Raises:
        SurgeryError: an existing `out` (without `overwrite`), bad settings or problems, records of other
            settings in `OUT.eval/`, or no answer graded correct (then `out` is not written).
    """
    options = options or ModelOptions()
    out = Path(out)
    check_new_file(out, overwrite)
    records = out.with_name(out.name + ".eval")
    if records.exists() and not records.is_dir():
        raise SurgeryError(f"{records.absolute()} is not a folder; move it away: solutions keeps its answers there")
    check_generation_options(max_new_tokens, batch_size, max_memory, options.device)
    check_prompt_style(prompt)
    bench = solution_problems(workload, "surgery solutions")
    problems, warning = select_problems(bench, limit, seed)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    prompt_messages(problems[0], bench.grader, shots)  # validates `shots` before any loading
    return _solve(
        open_checkpoint(model), bench, problems, out, records, limit, seed, max_new_tokens, batch_size, options,
        shots=shots, prompt=prompt, max_memory=max_memory,
    )  # fmt: skip


def source_solutions(
    model: str | Path,
    workload: str,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    options: ModelOptions | None = None,
) -> SolutionsResult:
    """`solutions` of every problem of `workload`, kept in surgery's cache (`--solutions source`).

    `workload` is a workload or a JSONL file, not a built-in benchmark (`solution_problems`).

    The entry, `solutions/KEY/` in the cache folder (`SURGERY_CACHE`, default `~/.cache/surgery`), is the eval
    results folder with the written workload inside it; KEY is the sha256 of the model's fingerprint, the
    problems and the settings, so a rerun finds it (and resumes it, if it was interrupted) and other settings
    never do. It is named `<workload>.<model>.solutions.jsonl`, the name a manifest ranked on it records.

    Raises:
        SurgeryError: as `solutions`, or a cache folder that cannot be written.
    """
    options = options or ModelOptions()
    check_generation_options(max_new_tokens, batch_size, None, options.device)
    ckpt = open_checkpoint(model)
    bench = solution_problems(workload, "--solutions source", benchmarks=False)
    problems = list(bench.problems)
    request = {
        "layout": _CACHE_LAYOUT,
        "model": ckpt.fingerprint,
        "problems": [bench.sha256, problem_ids_sha256(problems)],
        "max_new_tokens": max_new_tokens,
        "chat": options.chat,
        "dtype": options.dtype,
    }
    records = _entry(hashlib.sha256(json.dumps(request).encode()).hexdigest())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{bench.name}.{ckpt.hub.repo_id if ckpt.hub else ckpt.path.name}")
    out = records / f"{name}.solutions.jsonl"
    summary = read_entry(records / SUMMARY) if out.is_file() else None
    if isinstance(summary, dict):
        result = SolutionsResult(out, records, EvalSummary.from_dict(summary))
        print(f"solutions: reusing {out} ({_counted(result)})", file=sys.stderr)
        return result
    try:
        records.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SurgeryError(f"cannot write surgery's cache folder {records.parent} ({e}); set SURGERY_CACHE") from None
    result = _solve(ckpt, bench, problems, out, records, None, 42, max_new_tokens, batch_size, options)
    print(f"solutions: {_counted(result)}; kept in {out}", file=sys.stderr)
    return result


def ranking_workload(
    workload: str,
    solutions: str | None,
    out: str | Path,
    *,
    source: str | Path,
    method: str,
    max_new_tokens: int,
    batch_size: int,
    options: ModelOptions | None = None,
    overwrite: bool = False,
) -> str:
    """The workload `analyze` ranks on: `workload` itself, or with `solutions="source"` the source's correct
    answers to its problems (`source_solutions`, graded by the workload's gold answers).

    `out` (the manifest) and `method` are checked first, so that a refusal comes before the source generates.

    Raises:
        SurgeryError: an unknown `solutions`, a method that scores no solutions, an existing `out` (without
            `overwrite`), or as `source_solutions`.
    """
    if solutions is None:
        return workload
    check_solver(solutions)
    check_new_file(Path(out).absolute(), overwrite)
    if "gold" not in get_method(method).needs:
        scoring = methods_that_need("gold")
        raise SurgeryError(
            f"--solutions source changes the solutions that {' and '.join(scoring)} score, and --method {method} "
            f"scores none; use --method {scoring[0]}, or drop --solutions"
        )
    return str(
        source_solutions(source, workload, max_new_tokens=max_new_tokens, batch_size=batch_size, options=options).out
    )


def check_solver(solutions: str) -> None:
    """Refuse a `--solutions` value other than `SOLVERS`."""
    if solutions not in SOLVERS:
        raise SurgeryError(f"--solutions {solutions!r} is not one of {', '.join(SOLVERS)}")


def find_cached(name: str, sha256: str) -> Path | None:
    """The `source_solutions` file of this name and workload sha256 in surgery's cache, if it is still there.

    How `select` finds the workload a manifest was ranked on by `analyze --solutions source`: the manifest
    records the file's name and sha256, and the cache folder is not named by either.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+\.solutions\.jsonl", name):
        return None
    for path in sorted(_entry("*").parent.glob(f"*/{name}")):
        try:
            if load_workload(str(path)).sha256 == sha256:
                return path
        except SurgeryError:
            continue  # a damaged entry: not the one
    return None


def _entry(key: str) -> Path:
    """The cache folder of the `source_solutions` entry `key` (an eval results folder, where `cache.py`'s entries
    are files)."""
    return cache_file("solutions", key).with_suffix("")


def _counted(result: SolutionsResult) -> str:
    s = result.summary
    return f"{s.correct} of {s.problems} answers graded correct ({100 * s.accuracy:.1f}%)"


def _solve(
    ckpt: Checkpoint,
    bench: Benchmark,
    problems: list[Problem],
    out: Path,
    records: Path,
    limit: int | None,
    seed: int,
    max_new_tokens: int,
    batch_size: int,
    options: ModelOptions,
    *,
    shots: int = 0,
    prompt: str = "surgery",
    max_memory: str | None = None,
) -> SolutionsResult:
    """Generate and grade in `records` (eval's runner, resumable), then write the correct answers to `out`.

    No answer correct: nothing is written; `records`, if this run made it, is removed again.
    """
    ckpt.check_config()  # before transformers builds anything from it
    tokenizer = load_tokenizer(ckpt.path, options.trust_remote_code)
    made = not records.exists()

    def run(lm) -> EvalSummary:
        settings = eval_settings(
            lm,
            tokenizer,
            bench,
            problems,
            limit=limit,
            seed=seed,
            shots=shots,
            chat=options.chat,
            max_new_tokens=max_new_tokens,
            fingerprint=ckpt.fingerprint,
            prompt=prompt,
        )
        return evaluate_loaded(
            lm, tokenizer, bench, problems, settings, records, str(ckpt.path), batch_size, options.progress
        )

    summary = with_model(ckpt.path, options, run, max_memory=max_memory)
    result = SolutionsResult(out, records, summary)
    kept = [r for r in read_records(records / RECORDS) if r["correct"]]
    if not kept:
        if made:
            shutil.rmtree(records)
        raise SurgeryError(
            f"none of the {summary.problems} answers of {ckpt.path.name} to {bench.name} was graded correct, so there "
            f"is no solution to keep and {out.absolute()} was not written; use more problems, a larger "
            "--max-new-tokens, or the gold solutions"
        )
    lines = [
        {
            "id": r["id"],
            "prompt": r["prompt"],
            "solution": r["output"],
            "prompt_format": result.prompt_format,
            "gold": r["gold"],
        }
        for r in kept
    ]
    write_atomic(out, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8"))
    return result
