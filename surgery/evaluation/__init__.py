"""Evaluation: math benchmarks, batched generation, metrics."""
