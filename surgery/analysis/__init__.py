"""Stage 1, analysis: run each model on a workload and rank its modules into a manifest.

- `workloads.py`: the prompts (built-in train splits or JSONL).
- `profiling.py`: `profile`, one model's activation statistics, via forward hooks.
- `stats.py`: the stats file format.
- `ranking/`: the ranking methods, one file each, and `build_manifest`.
- `rank.py`: rank from existing stats files (`surgery manifest`).
- `analyze.py`: profile both models one at a time, then rank (`surgery analyze`).
"""
