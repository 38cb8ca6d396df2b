"""`random`: a seeded shuffle, the baseline any method must beat."""

from __future__ import annotations

import random

from surgery.analysis.ranking.registry import RankContext, ranking_method


@ranking_method("random", needs=("seed",))
def score(ctx: RankContext) -> dict[str, float]:
    """A seeded shuffle: the baseline any method must beat."""
    assert ctx.seed is not None
    rng = random.Random(ctx.seed)
    return {n: rng.random() for n in ctx.names}
