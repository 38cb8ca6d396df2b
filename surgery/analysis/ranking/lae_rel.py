"""`lae-rel`: the activation difference relative to its scale, comparable across modules."""

from __future__ import annotations

from surgery.analysis.ranking.params import StatsParams
from surgery.analysis.ranking.registry import RankContext, ranking_method


@ranking_method("lae-rel", needs=("stats",), params=StatsParams)
def score(ctx: RankContext) -> dict[str, float]:
    """|A_src - A_tgt| / (A_src + A_tgt): scale-free across modules."""
    assert ctx.src_stats is not None and ctx.tgt_stats is not None
    scores = {}
    for n in ctx.names:
        a, b = ctx.src_stats.mean[n], ctx.tgt_stats.mean[n]
        scores[n] = abs(a - b) / (a + b) if a + b > 0 else 0.0
    return scores
