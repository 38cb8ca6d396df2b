"""Stage 3, evaluation: score checkpoints on math benchmarks and report how much of the gap a transplant closed.

- `benchmarks.py`: GSM8K, MATH-500 and JSONL benchmarks; prompts, answer extraction, grading.
- `generate.py`: batched greedy generation and gold-solution NLL.
- `summary.py`: the typed `settings.json` and `summary.json` of one evaluation.
- `runner.py`: `evaluate`, resumable and data-parallel under torchrun.
- `metrics.py`: Wilson intervals, TIR, Recovery, paired bootstrap.
- `report.py`: `report`, source vs target vs patched.
- `k_grid.py`: the K values `sweep`, `select` and `analyze --auto-k` measure: the default grid and its parser.
- `sweep.py`: `sweep`, top-K swapped in memory for a range of K, with a random-K baseline.
- `select.py`: `choose_k` (`surgery select`): K chosen on held-out problems, written into the manifest.
- `analyze_select.py`: `analyze_and_select` (`analyze --auto-k`): rank, then choose K, into one manifest.

The functions are exported from `surgery` itself (`surgery.evaluate`, `surgery.choose_k`, ...); this
package imports none of its modules, so that a torch-free one (`k_grid`) stays torch-free.
"""
