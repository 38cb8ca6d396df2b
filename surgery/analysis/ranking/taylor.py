"""`taylor`: a first-order estimate of how much the task loss drops when each module is transplanted.

Score(m) = -<dL/dW_m, W_m^src - W_m^tgt>, summed over the module's tensors (weight and bias), where L
is the target's teacher-forced NLL of the workload's gold solutions (the mean over problems of each
one's mean NLL per solution token), at the target's weights. One forward and backward pass over the
workload, no weight update.

With a keep workload W (`--keep W`), one more backward pass, over W, and score(m) = gain(m) - loss(m):
gain(m) is the score above, loss(m) = +<dL_W/dW_m, W_m^src - W_m^tgt> the first-order rise of W's NLL
(same convention) when m is transplanted. Both parts go into the manifest: first order can misjudge a
module that an update moved far, and the measured swap (`swap-nll --keep`) is there to compare with.

Memory stays at about one model plus one layer's activations:
- each weight's gradient is consumed as soon as it is accumulated (a post-accumulate-grad hook reads
  W_src for that tensor from the source with `pread`, takes the dot product and frees the gradient):
  never both models, never a full set of gradients, and the source's pages never count toward RSS;
- each decoder layer is checkpointed (its activations are recomputed in the backward pass instead of
  kept), and a backward pass keeps its logits under `LOGITS_BYTES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgery.analysis.ranking.params import GoldParams
from surgery.analysis.ranking.registry import KeepScore, RankContext, ranking_method

if TYPE_CHECKING:
    from surgery.analysis.nll import GoldSet
    from surgery.checkpoints.swap import TensorReader

# The float32 logits of one backward batch; the log-softmax and both gradients are as large again.
LOGITS_BYTES = 64 * 2**20


def checkpoint_layers(model) -> int:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    transformers' own switch (`gradient_checkpointing_enable`) only acts in training mode, which would
    also turn dropout on; this wraps each layer's `forward` in eval mode. Returns how many were wrapped.
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
    return len(layers)


def _slopes(model, gold: GoldSet, source: TensorReader, module_of: dict[str, str], batch_size: int) -> dict[str, float]:
    """<dL/dW_m, W_m^src - W_m^tgt> for each module m that `module_of` maps tensors to, where L is the mean over
    `gold`'s rows of each row's mean NLL per solution token: one backward pass, each gradient consumed by a
    hook as soon as it is accumulated. Under torchrun, this rank's share (its batches); the caller sums them.
    """
    import torch

    from surgery.analysis.nll import batches, solution_nll
    from surgery.distributed import dist_info, mine

    params = dict(model.named_parameters())
    slopes = dict.fromkeys(module_of.values(), 0.0)

    def consume(tensor: str):
        def hook(param) -> None:
            delta = source[tensor].to(torch.float32) - param.detach().float()
            slopes[module_of[tensor]] += torch.sum(param.grad.float() * delta).item()
            param.grad = None  # consumed: the next tensor's gradient takes its place

        return hook

    handles = [params[t].register_post_accumulate_grad_hook(consume(t)) for t in module_of]
    try:
        vocab = model.get_output_embeddings().weight.shape[0]
        groups = batches(gold.prompts, gold.solutions, vocab, batch_size, LOGITS_BYTES)
        count = sum(len(rows) for rows in groups)
        # Under torchrun each rank takes every WORLD_SIZE-th batch.
        rank, world = dist_info()
        for rows in (groups[i] for i in mine(len(groups), rank, world)):
            nll = solution_nll(model, [gold.prompts[r] for r in rows], [gold.solutions[r] for r in rows], gold.pad_id)
            # L is the mean over all rows; each batch adds its share, so the hooks sum to <dL/dW, dW>.
            (nll.sum() / count).backward()
    finally:
        for handle in handles:
            handle.remove()
    return slopes


@ranking_method("taylor", needs=("gold",), params=GoldParams, takes_keep=True)
def score(ctx: RankContext) -> dict[str, float] | dict[str, KeepScore]:
    """First-order predicted drop of the target's gold-solution NLL: -<dL/dW, W_src - W_tgt>."""
    # Imported here: listing the registered methods (the CLI's --method choices) must not import torch.
    import torch

    from surgery.analysis.ranking.gold_model import target_and_gold
    from surgery.checkpoints.swap import TensorReader
    from surgery.distributed import all_sum, dist_info, init

    module_of = {t: c.name for c in ctx.candidates for t in c.tensors}
    with target_and_gold(ctx) as (model, gold, keep), TensorReader(ctx.source) as source:
        for name, p in model.named_parameters():
            p.requires_grad_(name in module_of)
        checkpoint_layers(model)
        _, world = dist_info()
        init(world)
        passes = [_slopes(model, g, source, module_of, ctx.batch_size) for g in (gold, keep) if g is not None]
    # The ranks' shares summed: the task's slopes, then the keep workload's.
    total = all_sum(torch.tensor([s[n] for s in passes for n in ctx.names], dtype=torch.float64), world).tolist()
    n = len(ctx.names)
    # 0.0 - v, not -v: a module the update left alone scores +0.0, as it always has, not -0.0.
    gain = {name: 0.0 - v for name, v in zip(ctx.names, total[:n], strict=True)}
    if keep is None:
        return gain
    return {name: KeepScore(gain[name], loss) for name, loss in zip(ctx.names, total[n:], strict=True)}
