"""`random`: a seeded shuffle, the baseline any method must beat."""

from __future__ import annotations

import random

from surgery.analysis.ranking.params import SeedParams
from surgery.analysis.ranking.registry import RankContext, ranking_method


@ranking_method("random", needs=("seed",), params=SeedParams, baseline=True)
def score(ctx: RankContext[SeedParams]) -> dict[str, float]:
    """A seeded shuffle: the baseline any method must beat."""
    rng = random.Random(ctx.params.seed)
    return {n: rng.random() for n in ctx.names}
