"""`surgery eval`: score one model on a math benchmark, resumably, optionally data-parallel.

Results directory:
- `settings.json`: everything that determines the results; a rerun must match it.
- `records.jsonl`: one line per problem, appended and fsynced per batch. A rerun skips the ids
  already there; a torn last line (a kill mid-write) is dropped, so no record is ever half.
- `summary.json`: accuracy with a 95% Wilson interval, mean gold NLL, fingerprint, settings.
- `keep/<name>.json` (with `--keep W`): the model's NLL per row of the keep set W (`evaluation.keep`),
  measured once after the generation and reused by a rerun; what `report --keep W` reads.

Under `torchrun`/`accelerate launch` each rank takes every WORLD_SIZE-th problem and writes
`records.rankN.jsonl`; rank 0 merges them into `records.jsonl` and writes the summary.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from surgery.analysis.nll import GoldSet, encode_gold, gold_nll
from surgery.analysis.workloads import PromptSet
from surgery.checkpoints.folder import open_checkpoint
from surgery.checkpoints.loading import check_generation_options, load_tokenizer, with_model
from surgery.checkpoints.options import ModelOptions
from surgery.checkpoints.streaming import cast_reader
from surgery.distributed import barrier, dist_info, init
from surgery.errors import SurgeryError
from surgery.evaluation.benchmarks import (
    LM_EVAL_STOP_STRINGS,
    STOP_STRINGS,
    Benchmark,
    Problem,
    check_prompt_style,
    grade,
    load_benchmark,
    prompt_messages,
    prompt_text,
    select_problems,
)
from surgery.evaluation.generate import greedy_generate, render, uses_chat
from surgery.evaluation.keep import KeepNLL, keep_sets, measured, reusable, save_keep
from surgery.evaluation.metrics import wilson_interval
from surgery.evaluation.summary import EvalSettings, EvalSummary
from surgery.fileio import write_atomic, write_json_atomic
from surgery.progress import progress_bar
from surgery.transplants.apply import apply_patch
from surgery.transplants.patch import open_patch
from surgery.version import library_versions

RECORDS = "records.jsonl"
SETTINGS = "settings.json"
SUMMARY = "summary.json"


def read_records(path: Path) -> list[dict]:
    """Complete records of a JSONL file; a torn last line (killed mid-write) is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]


def _append(path: Path, records: list[dict]) -> None:
    # One write per batch, fsynced: a kill loses at most the batch in flight.
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_or_write_settings(out: Path, settings: EvalSettings, rank: int, world: int) -> None:
    path = out / SETTINGS
    if path.is_file():
        # Through EvalSettings, so that a field added since (with its default) reads as it was then.
        try:
            old = EvalSettings.from_dict(json.loads(path.read_text())).to_dict()
        except (TypeError, ValueError):
            raise SurgeryError(
                f"{path} is not the settings file of a `surgery eval`; use a new -o, or delete that folder"
            ) from None
        new = settings.to_dict()
        if old != new:
            key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            raise SurgeryError(
                f"{out} holds results for other settings ({key}: {old.get(key)!r}, now {new.get(key)!r}); "
                "use a new -o, or delete that folder to start fresh"
            )
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, settings.to_dict())
    barrier(world)


def prepare(benchmark: str, limit: int | None, seed: int, shots: int) -> tuple[Benchmark, list[Problem]]:
    """Load and subset a benchmark, printing the too-large-limit warning."""
    bench = load_benchmark(benchmark)
    problems, warning = select_problems(bench, limit, seed)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    prompt_messages(problems[0], bench.grader, shots)  # validates `shots` before any loading
    return bench, problems


def problem_ids_sha256(problems: list[Problem]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(p.id for p in problems).encode()).hexdigest()


def eval_settings(
    lm,
    tokenizer,
    bench: Benchmark,
    problems: list[Problem],
    *,
    limit: int | None,
    seed: int,
    shots: int,
    chat: bool,
    max_new_tokens: int,
    fingerprint: str,
    prompt: str = "surgery",
) -> EvalSettings:
    """The settings of an evaluation of the loaded `lm` (`evaluate`'s and each of `sweep`'s), as used, not as asked.

    `chat` is recorded as used: a tokenizer without a template gets plain prompts, and lm-eval's prompt is
    plain. `dtype` is that of the loaded weights, because `--dtype auto` (the checkpoint's) and `fast` (the
    hardware's) name no dtype: results computed in bfloat16 must not resume, or be compared, as float32 ones.
    """
    return EvalSettings(
        benchmark=bench.name,
        benchmark_sha256=bench.sha256,
        problem_ids_sha256=problem_ids_sha256(problems),
        limit=limit,
        seed=seed,
        shots=shots,
        chat=uses_chat(tokenizer, chat and prompt != "lm-eval"),
        max_new_tokens=max_new_tokens,
        dtype=str(next(lm.parameters()).dtype).removeprefix("torch."),
        model_fingerprint=fingerprint,
        prompt=prompt,
    )


def evaluate(
    model: str | Path,
    benchmark: str,
    out: str | Path,
    *,
    limit: int | None = None,
    seed: int = 42,
    shots: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    max_memory: str | None = None,
    patch: str | Path | None = None,
    prompt: str = "surgery",
    keep: Sequence[str] = (),
    options: ModelOptions | None = None,
) -> EvalSummary:
    """Evaluate a checkpoint on a benchmark and write records and a summary to `out`.

    Args:
        model: checkpoint folder.
        benchmark: a built-in name (`BENCHMARKS`), or a JSONL path with question/answer fields.
        out: results folder; a rerun with the same settings resumes.
        limit, seed: score a seeded random subset of `limit` problems (the paper: 50, 42).
        shots: 0 (zero-shot) to 8 fixed chain-of-thought exemplars from the train split.
        max_new_tokens, batch_size: greedy decoding budget and batch size.
        max_memory: as in `profile`.
        patch: a patch folder (`transplant --patch`) to apply to the model in memory first; the summary
            then carries the fingerprint of the checkpoint `surgery apply` would write, so `report`
            treats the two alike. Not with `max_memory` (an offloaded weight cannot take the patch).
        prompt: `surgery` (the answer-format instruction; the chat template when `options.chat` and present) or
            `lm-eval` (lm-eval-harness's gsm8k prompt and stop strings, never a chat template).
        keep: keep sets (`general-text:N`, a JSONL, ...) to measure the model's NLL on, per row, into
            `out/keep/<name>.json` (see `evaluation.keep`) once the generation is complete; a rerun reuses a
            keep file of the same rows, model and dtype, so adding `keep` to a complete eval only measures it.
        options: how the model is loaded and prompted (dtype, chat template, device, trust_remote_code,
            a progress bar); default `ModelOptions()`.

    Returns:
        The summary (also in `out/summary.json`, as `summary.to_dict()`).

    Raises:
        SurgeryError: bad settings, benchmark, keep set, checkpoint or patch, or `out` holding results of other
            settings (a keep file of other rows or of another model too).
    """
    options = options or ModelOptions()
    check_generation_options(max_new_tokens, batch_size, max_memory, options.device)
    if patch is not None and max_memory is not None:
        # What keeps --max-memory off sweep: changing weights in place needs them all in memory.
        raise SurgeryError(
            "--patch is copied into the loaded weights, which --max-memory may leave on disk; drop --max-memory, "
            "or write the patched checkpoint with `surgery apply` and eval that with --max-memory"
        )
    check_prompt_style(prompt)
    bench, problems = prepare(benchmark, limit, seed, shots)
    workloads = keep_sets(keep)
    ckpt = open_checkpoint(model)
    ckpt.check_config()  # before transformers builds anything from it
    patched = open_patch(patch, originals=False) if patch is not None else None
    tokenizer = load_tokenizer(ckpt.path, options.trust_remote_code)
    golds = [encode_gold(tokenizer, w, options.chat) for w in workloads]  # a template that fails refuses here

    def run(lm) -> EvalSummary:
        fingerprint, label = ckpt.fingerprint, str(ckpt.path)
        if patched is not None:
            apply_patch(lm, patched)
            readers = {n: cast_reader(t.data.path, t.data.offset, t.dtype, t.dtype) for n, t in patched.tensors.items()}
            fingerprint = ckpt.fingerprint_with(readers)
            label = f"{ckpt.path} + patch {patched.path}"
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
            fingerprint=fingerprint,
            prompt=prompt,
        )
        # Checked before the generation writes anything: a keep file of other rows or of another model refuses.
        todo = keep_pending(Path(out), list(zip(workloads, golds, strict=True)), settings)
        summary = evaluate_loaded(
            lm, tokenizer, bench, problems, settings, Path(out), label, batch_size, options.progress
        )
        measure_keep(lm, Path(out), todo, settings)
        return summary

    return with_model(ckpt.path, options, run, max_memory=max_memory)


KeepSets = list[tuple[PromptSet, GoldSet]]  # keep sets, each with its rows encoded for the model measured


def keep_pending(out: Path, sets: KeepSets, settings: EvalSettings) -> KeepSets:
    """The keep sets whose NLL `out` does not hold yet for this model (`settings`); the others are reused, and say so.

    Raises:
        SurgeryError: `out` holds a keep file of other rows, of another model, or of another dtype or prompt format.
    """
    todo = []
    for workload, gold in sets:
        old = reusable(out, workload, fingerprint=settings.model_fingerprint, dtype=settings.dtype, chat=gold.chat)
        if old is None:
            todo.append((workload, gold))
        else:
            print(f"keep NLL on {old.workload} in {out}: already measured, reused", file=sys.stderr)
    return todo


def measure_keep(lm, out: Path, todo: KeepSets, settings: EvalSettings) -> None:
    """Measure and save the keep NLL of each set in `todo` (on rank 0 under torchrun; the others wait)."""
    rank, world = dist_info()
    if rank == 0:
        for workload, gold in todo:
            nll = measured(lm, gold)
            record = KeepNLL.of(
                workload, nll, fingerprint=settings.model_fingerprint, dtype=settings.dtype, chat=gold.chat
            )
            save_keep(out, record)
    barrier(world)


def evaluate_loaded(
    lm,
    tokenizer,
    bench: Benchmark,
    problems: list[Problem],
    settings: EvalSettings,
    out: Path,
    model_label: str,
    batch_size: int,
    progress: bool = True,
) -> EvalSummary:
    """Evaluate an already loaded model (used by `evaluate` and by the in-memory K sweep)."""
    rank, world = dist_info()
    init(world)
    done = {r["id"] for path in sorted(out.glob("records*.jsonl")) for r in read_records(path)}
    mine = [p for i, p in enumerate(problems) if i % world == rank and p.id not in done]
    part = out / (RECORDS if world == 1 else f"records.rank{rank}.jsonl")

    prompt_texts, prompts, fmt = [], [], "plain"
    for p in mine:
        text, ids, fmt = render(
            tokenizer,
            prompt_messages(p, bench.grader, settings.shots),
            prompt_text(p, bench.grader, settings.shots, settings.prompt),
            settings.chat,
        )
        prompt_texts.append(text)
        prompts.append(ids)
    stops = () if fmt == "chat" else LM_EVAL_STOP_STRINGS if settings.prompt == "lm-eval" else STOP_STRINGS
    # Only now, with every prompt rendered (a chat template that fails is refused above), is the folder made.
    _check_or_write_settings(out, settings, rank, world)

    if len(mine) < len(problems):
        done_here = len(problems) - len(mine)
        what = "already complete, nothing recomputed" if not mine else f"resumed: {done_here} of {len(problems)} done"
        print(f"eval {bench.name} in {out}: {what}", file=sys.stderr)
    with progress_bar(len(mine), f"eval {bench.name}", "problem", progress) as bar:

        def save(rows: list[int], outputs: list[str], counts: list[int]) -> None:
            sols = [tokenizer(mine[i].solution, add_special_tokens=False)["input_ids"] for i in rows]
            nlls = gold_nll(lm, [prompts[i] for i in rows], sols, tokenizer.pad_token_id)
            records = []
            for i, text, n, nll in zip(rows, outputs, counts, nlls, strict=True):
                p = mine[i]
                verdict = grade(bench.grader, text, p.answer)
                records.append(
                    {
                        "id": p.id,
                        "prompt": prompt_texts[i],
                        "output": text,
                        "gold": p.answer,
                        **verdict,
                        "tokens": n,
                        "nll": nll,
                    }
                )
            _append(part, records)
            bar.update(len(rows))

        greedy_generate(lm, tokenizer, prompts, settings.max_new_tokens, batch_size, stops, save)

    barrier(world)
    if rank == 0:
        summary = _finish(out, bench, problems, settings, model_label, fmt if mine else None)
    barrier(world)
    return summary if rank == 0 else EvalSummary.from_dict(json.loads((out / SUMMARY).read_text()))


def _finish(
    out: Path, bench: Benchmark, problems: list[Problem], settings: EvalSettings, model_label: str, fmt: str | None
) -> EvalSummary:
    """Merge rank files into records.jsonl (problem order) and write the summary."""
    by_id = {r["id"]: r for path in sorted(out.glob("records*.jsonl")) for r in read_records(path)}
    missing = [p.id for p in problems if p.id not in by_id]
    if missing:
        raise SurgeryError(f"{len(missing)} problems have no record (first: {missing[0]}); rerun to resume")
    records = [by_id[p.id] for p in problems]
    write_atomic(out / RECORDS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    for path in out.glob("records.rank*.jsonl"):
        path.unlink()
    correct = sum(r["correct"] for r in records)
    nlls = [r["nll"] for r in records if r["nll"] == r["nll"]]
    strict = sum(r["strict"] for r in records) if bench.grader == "gsm8k" else None
    summary = EvalSummary(
        model=model_label,
        benchmark=bench.name,
        grader=bench.grader,
        problems=len(records),
        correct=correct,
        accuracy=correct / len(records),
        accuracy_ci95=wilson_interval(correct, len(records)),
        nll_mean=sum(nlls) / len(nlls) if nlls else None,
        mean_tokens=sum(r["tokens"] for r in records) / len(records),
        prompt_format=fmt or _previous_format(out),
        settings=settings,
        versions=library_versions(),
        strict_accuracy=strict / len(records) if strict is not None else None,
        strict_accuracy_ci95=wilson_interval(strict, len(records)) if strict is not None else None,
    )
    write_json_atomic(out / SUMMARY, summary.to_dict())
    return summary


def _previous_format(out: Path) -> str | None:
    path = out / SUMMARY
    return json.loads(path.read_text()).get("prompt_format") if path.is_file() else None
