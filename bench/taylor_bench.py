"""Cost of the loss-based ranking methods on SmolLM2-135M-Instruct, against one `profile` of the same workload.

    .venv/bin/python bench/taylor_bench.py [--prompts 64] [--repeat 3] [--swap 4,16] [--out bench/out/taylor]

Each command runs in a fresh child (peak RSS and wall measured by the shared launcher), all in this
one script, `--repeat` times, after waiting for a quiet machine; the table shows the best run and the
spread of the repeats. Measured:
- `surgery profile BASE -w gsm8k-train:N` (128 new tokens, batch 8): one model's activation statistics;
- `surgery manifest --method taylor -w gsm8k-train:N` (batch 8): one forward and backward pass;
- `surgery manifest --method swap-nll` limited to the top A and the top B candidates of that taylor
  ranking (`--swap A,B`); the cost per candidate is the difference divided by B - A.
The source is the base with every MLP weight perturbed (scale 0.02, seed 1): the costs do not depend on
the weights' values, only on their shapes. Targets (issue 13): taylor <= 3x one profile in wall time,
and <= 1.5x its peak RSS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from profile_bench import Run, convert_smollm2, log, make_perturbed, measure, surgery_cmd, wait_for_quiet


def spread(runs: list[Run], key: str) -> str:
    values = [getattr(r, key) for r in runs]
    return f"{min(values):.1f} (runs {', '.join(f'{v:.1f}' for v in values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--swap", default="4,16", help="A,B: swap-nll over the top A and the top B candidates")
    ap.add_argument("--out", type=Path, default=Path("bench/out/taylor"))
    args = ap.parse_args()
    few, many = (int(x) for x in args.swap.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    base = convert_smollm2(args.out / "smollm2")
    source = make_perturbed(base, args.out / "smollm2-perturbed", 0.02, 1)
    workload = f"gsm8k-train:{args.prompts}"
    # Not "bench/": that would match this script itself and wait forever.
    busy = r"pytest|(profile|transplant|eval)_bench\.py|study\.py|surgery (eval|profile|analyze|sweep|demo)"
    wait_for_quiet(busy, 1.0, 5.0, 600.0)
    cli = surgery_cmd()
    scratch = args.out / "runs"
    taylor_out = args.out / "taylor.json"
    commands = {
        "profile": [*cli, "profile", str(base), "-w", workload, "--batch-size", "8", "-q", "--overwrite",
                    "-o", str(scratch / "s.st")],
        "taylor": [*cli, "manifest", "--method", "taylor", "-s", str(source), "-t", str(base), "-w", workload,
                   "--batch-size", "8", "-q", "--overwrite", "-o", str(taylor_out)],
    }  # fmt: skip
    for n in (few, many):
        commands[f"swap-nll top {n}"] = [
            *cli, "manifest", "--method", "swap-nll", "-s", str(source), "-t", str(base), "-w", workload,
            "--batch-size", "8", "--candidates-from", str(taylor_out), "--max-candidates", str(n), "-q", "--overwrite",
            "-o", str(args.out / f"swap{n}.json"),
        ]  # fmt: skip
    runs: dict[str, list[Run]] = {k: [] for k in commands}
    t0 = time.perf_counter()
    for rep in range(args.repeat):
        for name, cmd in commands.items():
            log(f"[repeat {rep + 1}/{args.repeat}] {name}")
            runs[name].append(measure(cmd, scratch))
    print(f"SmolLM2-135M-Instruct (float32), workload {workload}; best of {args.repeat} (all runs in brackets)\n")
    print("| command | wall s | peak RSS MiB |")
    print("|---|---|---|")
    for name, rs in runs.items():
        print(f"| {name} | {spread(rs, 'wall_s')} | {spread(rs, 'rss_mib')} |")
    best = {k: min(r.wall_s for r in rs) for k, rs in runs.items()}
    rss = {k: min(r.rss_mib for r in rs) for k, rs in runs.items()}
    per_candidate = (best[f"swap-nll top {many}"] - best[f"swap-nll top {few}"]) / (many - few)
    ratios = [r.wall_s / p.wall_s for r, p in zip(runs["taylor"], runs["profile"], strict=True)]
    print()
    each = ", ".join(f"{x:.2f}" for x in ratios)
    print(f"- taylor / profile wall: {best['taylor'] / best['profile']:.2f}x best to best (per repeat: {each}; "
          f"median {statistics.median(ratios):.2f}) - target <= 3x")  # fmt: skip
    print(f"- taylor / profile peak RSS: {rss['taylor'] / rss['profile']:.2f}x - target <= 1.5x")
    print(f"- swap-nll: {per_candidate:.2f} s per candidate ({args.prompts} problems, one teacher-forced pass)")
    print(f"- measured in {time.perf_counter() - t0:.0f} s; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
