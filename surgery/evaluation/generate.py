"""Batched greedy generation with plain `transformers` (teacher-forced NLL is `surgery.analysis.nll`).

Prompts are sorted by length so a batch holds similar lengths (little padding), left-padded
so every row's next token sits at the last position, and decoded greedily with `generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from surgery.checkpoints.loading import chat_text, input_device


def uses_chat(tokenizer, chat: bool) -> bool:
    """Whether prompts go through the chat template: asked for, and the tokenizer has one."""
    return chat and bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict[str, str]], plain: str, chat: bool) -> tuple[str, list[int], str]:
    """A prompt as text and token ids: the chat template when asked and available, else the plain text.

    Returns:
        (text, ids, format) where format is "chat" or "plain".
    """
    if uses_chat(tokenizer, chat):
        text = chat_text(tokenizer, messages)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"], "chat"
    return plain, tokenizer(plain)["input_ids"], "plain"


def _new_tokens(row: list[int], stop_ids: set[int], pad: int | None) -> list[int]:
    """The generated tokens up to and including the first EOS; padding after it dropped."""
    for i, tok in enumerate(row):
        if tok in stop_ids:
            return row[: i + 1]
    while row and pad is not None and row[-1] == pad:
        row = row[:-1]
    return row


def _cut(text: str, stops: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


@torch.inference_mode()
def greedy_generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    stop_strings: Sequence[str] = (),
    on_batch: Callable[[list[int], list[str], list[int]], None] | None = None,
) -> None:
    """Greedy-decode every prompt, calling `on_batch(indices, texts, token_counts)` per batch.

    Args:
        model, tokenizer: a loaded causal LM and its left-padding tokenizer.
        prompts: token ids per prompt.
        max_new_tokens: the decoding budget per prompt.
        batch_size: prompts per `generate` call.
        stop_strings: completion ends at the first of these (the text is cut there too).
        on_batch: receives each finished batch, so callers can persist results as they come.
    """
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    eos = model.generation_config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    device = input_device(model)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        enc = tokenizer.pad({"input_ids": [prompts[i] for i in rows]}, return_tensors="pt").to(device)
        kwargs = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        kept = [_new_tokens(r, stop_ids, tokenizer.pad_token_id) for r in new]
        texts = [_cut(tokenizer.decode(k, skip_special_tokens=True), stop_strings) for k in kept]
        if on_batch is not None:
            on_batch(rows, texts, [len(k) for k in kept])
