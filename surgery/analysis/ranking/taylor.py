"""`taylor`: a first-order estimate of how much the task loss drops when each module is transplanted.

Score(m) = -<dL/dW_m, W_m^src - W_m^tgt>, summed over the module's tensors (weight and bias), where L
is the target's teacher-forced NLL of the workload's gold solutions (the mean over problems of each
one's mean NLL per solution token), at the target's weights. One forward and backward pass over the
workload, no weight update.

Memory stays at about one model plus one layer's activations:
- each weight's gradient is consumed as soon as it is accumulated (a post-accumulate-grad hook reads
  W_src for that tensor from the source with `pread`, takes the dot product and frees the gradient):
  never both models, never a full set of gradients, and the source's pages never count toward RSS;
- each decoder layer is checkpointed (its activations are recomputed in the backward pass instead of
  kept), and a backward pass keeps its logits under `LOGITS_BYTES`.
"""

from __future__ import annotations

from contextlib import ExitStack

from surgery.analysis.ranking.params import GoldParams
from surgery.analysis.ranking.registry import RankContext, ranking_method

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


@ranking_method("taylor", needs=("gold",), params=GoldParams)
def score(ctx: RankContext) -> dict[str, float]:
    """First-order predicted drop of the target's gold-solution NLL: -<dL/dW, W_src - W_tgt>."""
    # Imported here: listing the registered methods (the CLI's --method choices) must not import torch.
    import torch

    from surgery.analysis.nll import batches, solution_nll
    from surgery.analysis.ranking.gold_model import target_and_gold
    from surgery.checkpoints.swap import TensorReader
    from surgery.distributed import all_sum, dist_info, init, mine

    module_of = {t: c.name for c in ctx.candidates for t in c.tensors}
    scores = dict.fromkeys(ctx.names, 0.0)
    with target_and_gold(ctx) as (model, gold), ExitStack() as stack:
        source = stack.enter_context(TensorReader(ctx.source))
        params = dict(model.named_parameters())
        for p in params.values():
            p.requires_grad_(False)

        def consume(tensor: str):
            def hook(param) -> None:
                delta = source[tensor].to(torch.float32) - param.detach().float()
                scores[module_of[tensor]] -= torch.sum(param.grad.float() * delta).item()
                param.grad = None  # consumed: the next tensor's gradient takes its place

            return hook

        for tensor in module_of:
            params[tensor].requires_grad_(True)
            stack.callback(params[tensor].register_post_accumulate_grad_hook(consume(tensor)).remove)
        checkpoint_layers(model)
        vocab = model.get_output_embeddings().weight.shape[0]
        groups = batches(gold.prompts, gold.solutions, vocab, ctx.batch_size, LOGITS_BYTES)
        count = sum(len(rows) for rows in groups)
        # Under torchrun each rank takes every WORLD_SIZE-th batch; the scores are summed below.
        rank, world = dist_info()
        init(world)
        for rows in (groups[i] for i in mine(len(groups), rank, world)):
            nll = solution_nll(model, [gold.prompts[r] for r in rows], [gold.solutions[r] for r in rows], gold.pad_id)
            # L is the mean over all problems; each batch adds its share, so the hooks sum to <dL/dW, dW>.
            (nll.sum() / count).backward()
    total = all_sum(torch.tensor([scores[n] for n in ctx.names], dtype=torch.float64), world)
    return dict(zip(ctx.names, total.tolist(), strict=True))
