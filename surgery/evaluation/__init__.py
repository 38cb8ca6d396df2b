"""Stage 3, evaluation: score checkpoints on math benchmarks and report how much of the gap a transplant closed.

- `benchmarks.py`: GSM8K, MATH-500 and JSONL benchmarks; prompts, answer extraction, grading.
- `generate.py`: batched greedy generation and gold-solution NLL.
- `summary.py`: the typed `settings.json` and `summary.json` of one evaluation.
- `runner.py`: `evaluate`, resumable and data-parallel under torchrun.
- `metrics.py`: Wilson intervals, TIR, Recovery, paired bootstrap.
- `report.py`: `report`, source vs target vs patched.
- `sweep.py`: `sweep`, top-K swapped in memory for a range of K, with a random-K baseline.
"""
