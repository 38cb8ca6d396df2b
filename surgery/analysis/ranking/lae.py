"""`lae`: the paper's layer activation estimate, the signed difference A_src - A_tgt."""

from __future__ import annotations

from surgery.analysis.ranking.params import StatsParams
from surgery.analysis.ranking.registry import RankContext, ranking_method


@ranking_method("lae", needs=("stats",), params=StatsParams, reference="arXiv 2602.16189")
def score(ctx: RankContext) -> dict[str, float]:
    """The paper's signed difference of mean |activation|, A_src - A_tgt."""
    assert ctx.src_stats is not None and ctx.tgt_stats is not None
    return {n: ctx.src_stats.mean[n] - ctx.tgt_stats.mean[n] for n in ctx.names}
