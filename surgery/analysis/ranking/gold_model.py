"""The target model and the workload's gold solutions, loaded once for the loss-based methods."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from surgery.analysis.nll import GoldSet, encode_gold
from surgery.analysis.ranking.registry import RankContext
from surgery.checkpoints.loading import load_model, load_tokenizer


@contextmanager
def target_and_gold(ctx: RankContext) -> Iterator[tuple[object, GoldSet, GoldSet | None]]:
    """The target as a transformers model (in `ctx.options.dtype`), the encoded gold workload, and the encoded
    keep workload (None without one), tokenized alike; the model is freed on exit."""
    assert ctx.workload is not None
    tokenizer = load_tokenizer(ctx.target.path, ctx.options.trust_remote_code)
    gold = encode_gold(tokenizer, ctx.workload, ctx.options.chat)
    keep = encode_gold(tokenizer, ctx.keep, ctx.options.chat) if ctx.keep is not None else None
    model = load_model(ctx.target.path, ctx.options)
    try:
        yield model, gold, keep
    finally:
        del model
        gc.collect()
