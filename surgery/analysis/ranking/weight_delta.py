"""`weight-delta`: how much a module's weights changed, streamed from both checkpoints in bounded memory."""

from __future__ import annotations

import math

from surgery.analysis.ranking.registry import RankContext, ranking_method
from surgery.checkpoints.streaming import CHUNK_BYTES, ReadOnlyFiles, tensor_chunks


@ranking_method("weight-delta")
def score(ctx: RankContext) -> dict[str, float]:
    """||W_src - W_tgt|| / ||W_tgt|| (Frobenius, over all of a module's tensors); needs no activations."""
    import torch  # here, not at the top: listing the registered methods must not import torch

    scores = {}
    elements = CHUNK_BYTES // 8
    with ReadOnlyFiles() as files:
        for c in ctx.candidates:
            diff = norm = 0.0
            for t in c.tensors:
                s, g = ctx.source.tensors[t], ctx.target.tensors[t]
                chunks_s = tensor_chunks(files.fd(s.shard.path), s.offset, s.info.nbytes, s.info.dtype, elements)
                chunks_t = tensor_chunks(files.fd(g.shard.path), g.offset, g.info.nbytes, g.info.dtype, elements)
                for a, b in zip(chunks_s, chunks_t, strict=True):
                    a64, b64 = a.to(torch.float64), b.to(torch.float64)
                    diff += torch.sum((a64 - b64) ** 2).item()
                    norm += torch.sum(b64**2).item()
            scores[c.name] = math.sqrt(diff) / math.sqrt(norm) if norm > 0 else math.sqrt(diff)
    return scores
