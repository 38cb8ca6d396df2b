"""`random-changed`: a seeded shuffle of the modules whose weights differ, then the unchanged ones.

The baseline to beat when an update touched only some modules: plain `random` wastes picks on
modules that are equal in both checkpoints, which any method that looks at the weights avoids.
"""

from __future__ import annotations

import random

from surgery.analysis.ranking.params import SeedParams
from surgery.analysis.ranking.registry import RankContext, ranking_method
from surgery.checkpoints.streaming import CHUNK_BYTES, ReadOnlyFiles, read_chunks


@ranking_method("random-changed", needs=("seed",), params=SeedParams)
def score(ctx: RankContext[SeedParams]) -> dict[str, float]:
    """A seeded shuffle of the modules whose weights differ (scores in [0, 1)); unchanged modules score -1."""
    rng = random.Random(ctx.params.seed)
    scores = {}
    with ReadOnlyFiles() as files:
        for c in ctx.candidates:
            draw = rng.random()  # drawn for every module, so the order does not depend on which ones changed
            scores[c.name] = draw if _differs(c.tensors, ctx, files) else -1.0
    return scores


def _differs(tensors: tuple[str, ...], ctx: RankContext, files: ReadOnlyFiles) -> bool:
    """Whether any byte of the module's tensors differs (dtypes differing counts as a difference)."""
    for t in tensors:
        s, g = ctx.source.tensors[t], ctx.target.tensors[t]
        if s.info.dtype != g.info.dtype:
            return True
        a = read_chunks(files.fd(s.shard.path), s.offset, s.nbytes, CHUNK_BYTES)
        b = read_chunks(files.fd(g.shard.path), g.offset, g.nbytes, CHUNK_BYTES)
        if any(x != y for x, y in zip(a, b, strict=True)):
            return True
    return False
