"""`swap-nll`: measured, not estimated: the target's gold NLL with each module alone swapped in.

Score(m) = NLL_target - NLL_(target with m from the source), on the workload's gold solutions. One
teacher-forced pass per candidate, the module restored bit for bit after each; `--candidates-from
M0 --max-candidates N` limits it to the top N of another ranking.

With a keep workload W (`--keep W`), each swap is measured on W too, and score(m) = drop(m) - rise(m):
the task NLL's drop above less the rise of W's NLL with m swapped in. Both parts go into the manifest.
"""

from __future__ import annotations

from surgery.analysis.ranking.params import GoldParams
from surgery.analysis.ranking.registry import KeepScore, RankContext, ranking_method


@ranking_method("swap-nll", needs=("gold",), params=GoldParams, takes_keep=True)
def score(ctx: RankContext) -> dict[str, float] | dict[str, KeepScore]:
    """Measured drop of the target's gold-solution NLL when the module alone is swapped in."""
    # Imported here: listing the registered methods must not import torch.
    from surgery.analysis.nll import mean_nll
    from surgery.analysis.ranking.gold_model import target_and_gold
    from surgery.checkpoints.swap import swapped

    scores: dict = {}
    with target_and_gold(ctx) as (model, gold, keep):
        base = mean_nll(model, gold)
        base_keep = mean_nll(model, keep) if keep is not None else 0.0
        for c in ctx.candidates:
            with swapped(model, ctx.source, list(c.tensors)):
                drop = base - mean_nll(model, gold)
                scores[c.name] = drop if keep is None else KeepScore(drop, mean_nll(model, keep) - base_keep)
    return scores
