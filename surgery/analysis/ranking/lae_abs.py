"""`lae-abs`: the size of the activation difference, whichever model is larger."""

from __future__ import annotations

from surgery.analysis.ranking.params import StatsParams
from surgery.analysis.ranking.registry import RankContext, ranking_method


@ranking_method("lae-abs", needs=("stats",), params=StatsParams)
def score(ctx: RankContext) -> dict[str, float]:
    """|A_src - A_tgt|: the size of the difference, in either direction."""
    assert ctx.src_stats is not None and ctx.tgt_stats is not None
    return {n: abs(ctx.src_stats.mean[n] - ctx.tgt_stats.mean[n]) for n in ctx.names}
