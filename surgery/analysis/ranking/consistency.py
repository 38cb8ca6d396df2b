"""`consistency`: the per-prompt activation difference over its standard error."""

from __future__ import annotations

import math

from surgery.analysis.ranking.params import StatsParams
from surgery.analysis.ranking.registry import RankContext, ranking_method
from surgery.errors import SurgeryError

# Standard-error floor: identical per-prompt differences would divide by 0.
_SE_FLOOR = 1e-12


@ranking_method("consistency", needs=("stats",), params=StatsParams)
def score(ctx: RankContext) -> dict[str, float]:
    """Mean per-prompt difference over its standard error: a difference that holds on every prompt ranks first."""
    assert ctx.src_stats is not None and ctx.tgt_stats is not None
    scores = {}
    for n in ctx.names:
        d = ctx.src_stats.per_prompt[n] - ctx.tgt_stats.per_prompt[n]
        if d.numel() < 2:
            raise SurgeryError("the consistency method needs a workload of at least 2 prompts")
        se = d.std(unbiased=True).item() / math.sqrt(d.numel())
        scores[n] = d.mean().item() / max(se, _SE_FLOOR)
    return scores
