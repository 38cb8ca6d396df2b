"""Ranking methods: score every candidate module of a pair, then rank them into a manifest.

One file per method, each registering one scoring function (see `registry.py`):
- `lae`: the paper's signed difference A_src - A_tgt (the default).
- `lae-abs`: |A_src - A_tgt|.
- `lae-rel`: |A_src - A_tgt| / (A_src + A_tgt), scale-free across modules.
- `consistency`: mean per-prompt difference over its standard error.
- `weight-delta`: ||W_src - W_tgt|| / ||W_tgt||, streamed; needs no activations.
- `taylor`: -<dL/dW, W_src - W_tgt>, the first-order drop of the target's gold-solution NLL.
- `swap-nll`: the measured drop of that NLL with each module alone swapped in.
  Both take a keep workload (`--keep W`): a module's score is then its task gain less its loss on W.
- `random`: a seeded shuffle; the baseline any method must beat.
- `random-changed`: a seeded shuffle of the modules whose weights differ; the baseline when an
  update touched only some modules.

To add a method: a new file here with one `@ranking_method` function (its needs, and its parameters
as a dataclass of `params.py`), its import below, then `python -m surgery.analysis.ranking.schema` to
write its name into the manifest schema's `method.name` enum.
"""

# isort: off
# Imported to register the methods; this order is the order of `--help` and of error messages.
from surgery.analysis.ranking import lae, lae_abs, lae_rel, consistency, weight_delta, taylor, swap_nll  # noqa: F401
from surgery.analysis.ranking import random_order, random_changed  # noqa: F401

# isort: on
from surgery.analysis.ranking.build import build_manifest, check_comparable, check_stats_match
from surgery.analysis.ranking.registry import (
    RANKING_METHODS,
    KeepScore,
    RankContext,
    RankingMethod,
    baseline_method,
    check_needs,
    get_method,
    methods_taking_keep,
    methods_that_need,
    ranking_method,
)

# Every method name, in the order `--help` lists them.
METHODS: tuple[str, ...] = tuple(RANKING_METHODS)

__all__ = [
    "METHODS",
    "RANKING_METHODS",
    "KeepScore",
    "RankContext",
    "RankingMethod",
    "baseline_method",
    "build_manifest",
    "check_comparable",
    "check_needs",
    "check_stats_match",
    "get_method",
    "methods_taking_keep",
    "methods_that_need",
    "ranking_method",
]
