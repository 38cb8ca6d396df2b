"""Two tiny Llama checkpoints that stand in for a real pair in the README's examples, built in seconds.

    python -m tests.tiny_pair ./llama-chat ./llama-math

The target (`llama-chat`) is a randomly initialised 4-layer Llama (hidden size 32) with a byte-level
BPE tokenizer (trained on GSM8K train text) and a chat template; the source (`llama-math`) is the
target after a few seeded AdamW steps on GSM8K **train** solutions, so its gold-solution NLL is
clearly lower than the target's and every command of the README (rankings, `select`, `sweep`,
`eval`) has a real gap to measure. Run it from the repository root (it imports `tests.helpers`);
`tests/test_readme.py` runs the
README's examples on this pair.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from surgery.data import read_jsonl_gz, strip_calculator
from tests.helpers import CHAT_TEMPLATE, make_model

LAYERS = 4  # 28 candidate modules: enough for the README's K of 16, few enough that its examples run in minutes
VOCAB = 1024  # a byte-level BPE trained on GSM8K train text: prompts 3-4x shorter than with characters
STEPS = 40
BATCH = 8
CHARS = 192  # characters of each training text: the question and the start of its solution


def build(target: Path, source: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Write the target (random init) and the source (the target fine-tuned on GSM8K train text).

    Args:
        target: folder for the target; must not exist.
        source: folder for the source; must not exist.
        seed: seeds the initialisation and the fine-tune, so the pair is the same on every run
            on one kind of CPU.

    Returns:
        (target, source).
    """
    rows = read_jsonl_gz("gsm8k-train.jsonl.gz")
    texts = [f"{r['question']}\n{strip_calculator(r['answer'])}" for r in rows]
    make_model(target, seed, shard="50KB", num_hidden_layers=LAYERS, vocab_size=VOCAB)
    save_bpe_tokenizer(target, texts)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target)
    texts = [t[:CHARS] for t in texts[: STEPS * BATCH]]
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(STEPS):
        batch = tokenizer(texts[step * BATCH : (step + 1) * BATCH], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(source, max_shard_size="50KB")
    tokenizer.save_pretrained(source)
    return target, source


def save_bpe_tokenizer(path: Path, texts: list[str]) -> None:
    """A byte-level BPE of VOCAB tokens trained on `texts`, with the tests' chat template, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, initial_alphabet=alphabet)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("source", type=Path)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    build(args.target, args.source)
    print(f"wrote {args.target} (target) and {args.source} (source)")


if __name__ == "__main__":
    main()
