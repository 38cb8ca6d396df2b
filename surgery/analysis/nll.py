"""Teacher-forced NLL of gold solutions: measured (`gold_nll`) and differentiable (`solution_nll`).

The quantity the loss-based ranking methods (`taylor`, `swap-nll`), `select` and `eval` share: for
each problem, the mean negative log-likelihood per token of its gold solution after its prompt;
a workload's NLL is the mean over its problems.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.analysis.profiling import render_prompts
from surgery.analysis.workloads import PromptSet, require_solutions
from surgery.checkpoints.loading import input_device

# Logits are batch x positions x vocab floats; keep one NLL forward pass under this many bytes.
_NLL_LOGITS_BYTES = 256 * 2**20


def _padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (positions count from each row's first token)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        ids[j, width - len(s) :] = torch.tensor(s)
        mask[j, width - len(s) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def solution_nll(model, prompts: list[list[int]], solutions: list[list[int]], pad_id: int) -> torch.Tensor:
    """Per-row mean NLL per solution token, differentiable (autograd tracks it when grads are on).

    Args:
        model: a loaded causal LM.
        prompts, solutions: token ids per row; every solution non-empty.
        pad_id: id used for left padding (masked out).

    Returns:
        A tensor [rows] on the CPU, float32 (float64 for a float64 model).
    """
    device = input_device(model)
    ids, mask, positions = _padded([p + s for p, s in zip(prompts, solutions, strict=True)], pad_id)
    keep = max(map(len, solutions)) + 1
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=keep,
        use_cache=False,  # one pass, no generation: a cache would only cost memory (and break a recompute)
    ).logits
    # At least float32 (bf16 logits would round the NLL); a float64 model keeps float64.
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).cpu()
    rows = []
    for j, sol in enumerate(solutions):
        n = len(sol)
        # Position k of the kept slice predicts the token at kept position k + 1.
        predicted = logprobs[j, keep - n - 1 : keep - 1]
        rows.append(-predicted.gather(1, torch.tensor(sol)[:, None]).mean())
    return torch.stack(rows)


@dataclass(frozen=True)
class GoldSet:
    """A workload's prompts and gold solutions as token ids, ready for `gold_nll` and `solution_nll`."""

    prompts: list[list[int]]
    solutions: list[list[int]]
    pad_id: int
    chat: bool


def encode_gold(tokenizer, workload: PromptSet, chat: bool) -> GoldSet:
    """Tokenize a workload's prompts and solutions for `gold_nll` and `solution_nll`.

    Prompts to render are rendered as `profile` renders them (the chat template when asked and present);
    rendered ones (`workload.prompt_format`) are used as they are. A row without a prompt (plain text) that
    the tokenizer gives no BOS for is conditioned on its first token, which is not scored.

    Raises:
        SurgeryError: the workload has no solutions.
    """
    solutions = require_solutions(workload, "this measure")
    texts, used_chat = render_prompts(tokenizer, workload.prompts, chat, workload.prompt_format)
    prompts = [tokenizer(t, add_special_tokens=not used_chat)["input_ids"] for t in texts]
    scored = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in solutions]
    for prompt, solution in zip(prompts, scored, strict=True):
        if not prompt and solution:
            prompt.append(solution.pop(0))
    return GoldSet(prompts, scored, tokenizer.pad_token_id, used_chat)


def batches(
    prompts: list[list[int]],
    solutions: list[list[int]],
    vocab: int,
    max_rows: int | None = None,
    logits_bytes: int = _NLL_LOGITS_BYTES,
) -> list[list[int]]:
    """Row indices in batches, longest first, each keeping its float32 logits under `logits_bytes` (and at
    most `max_rows` rows); empty solutions skipped."""
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(solutions[i])))
    out, i = [], 0
    while i < len(order):
        size = max(1, logits_bytes // ((len(solutions[order[i]]) + 1) * vocab * 4))
        size = min(size, max_rows) if max_rows else size
        rows = [r for r in order[i : i + size] if solutions[r]]
        i += size
        if rows:
            out.append(rows)
    return out


@torch.inference_mode()
def gold_nll(model, prompts: list[list[int]], solutions: list[list[int]], pad_id: int) -> list[float]:
    """Teacher-forced mean negative log-likelihood per token of each gold solution.

    A continuous measure that still moves when a small model's accuracy is 0.

    Args:
        model: a loaded causal LM.
        prompts: prompt token ids per problem.
        solutions: gold solution token ids per problem (appended to the prompt).
        pad_id: id used for left padding (masked out).

    Returns:
        Mean NLL in nats per solution token, per problem (nan for an empty solution).
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    result = [float("nan")] * len(prompts)
    for rows in batches(prompts, solutions, vocab):
        nll = solution_nll(model, [prompts[r] for r in rows], [solutions[r] for r in rows], pad_id)
        for j, r in enumerate(rows):
            result[r] = nll[j].item()
    return result


def mean_nll(model, gold: GoldSet) -> float:
    """The workload's NLL: the mean over its problems of each one's mean NLL per solution token."""
    values = [v for v in gold_nll(model, gold.prompts, gold.solutions, gold.pad_id) if v == v]
    return sum(values) / len(values)
