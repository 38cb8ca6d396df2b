"""`swap-nll`: measured, not estimated: the target's gold NLL with each module alone swapped in.

Score(m) = NLL_target - NLL_(target with m from the source), on the workload's gold solutions. One
teacher-forced pass per candidate, the module restored bit for bit after each; `--candidates-from
M0 --max-candidates N` limits it to the top N of another ranking.
"""

from __future__ import annotations

from surgery.analysis.ranking.params import GoldParams
from surgery.analysis.ranking.registry import RankContext, ranking_method


@ranking_method("swap-nll", needs=("gold",), params=GoldParams)
def score(ctx: RankContext) -> dict[str, float]:
    """Measured drop of the target's gold-solution NLL when the module alone is swapped in."""
    # Imported here: listing the registered methods must not import torch.
    from surgery.analysis.nll import mean_nll
    from surgery.analysis.ranking.gold_model import target_and_gold
    from surgery.checkpoints.swap import swapped

    scores = {}
    with target_and_gold(ctx) as (model, gold):
        base = mean_nll(model, gold)
        for c in ctx.candidates:
            with swapped(model, ctx.source, list(c.tensors)):
                scores[c.name] = base - mean_nll(model, gold)
    return scores
