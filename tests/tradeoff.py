"""A tiny pair with a known trade-off, for keep-aware ranking and selection (`--keep`).

    from tests.tradeoff import build_tradeoff
    pair = build_tradeoff(tmp_path)   # pair.source, pair.target, pair.task, pair.keep, pair.damaged, pair.tuned

The SOURCE is a tiny Llama trained on task A (`task.jsonl`: questions and answers) and on some plain
prose. The TARGET is the source with two modules changed, every other one the source's bit for bit:
- `tuned` (layer 1's self_attn.v_proj) took 5 Adam steps on task B (`keep.jsonl`, plain text of another
  kind), that module alone: the target gained task B there, and lost a little of task A;
- `damaged` (layer 0's mlp.down_proj) has noise added: the target lost task A there.
So on task A alone both changed modules are worth transplanting, the damaged one far more; with
`--keep keep.jsonl` only the damaged one is: transplanting the tuned one costs task B more than it gives
back on A. Measured on this pair (nats per token; taylor's first-order estimate / swap-nll's measured swap):

    module    task gain (A)   keep loss (B)      task NLL: source 1.40, target 1.86
    damaged   0.78 / 0.42     -0.11 / +0.02      keep NLL: source 5.18, target 3.87
    tuned     0.11 / 0.05     +0.28 / +0.87

First order gets every sign right here, and misjudges the tuned module's keep loss by 3x, as the issue
that introduced `--keep` warns.

Seeded throughout, and trained on one thread: the sums do not depend on the number of cores, and
threads only slow a model this small down. Built in about a second.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from surgery.analysis.nll import GoldSet, encode_gold, solution_nll
from surgery.analysis.workloads import PromptSet, load_workload
from surgery.checkpoints.loading import load_tokenizer
from tests.helpers import model_with_tokenizer, save_tokenizer

# The seed of the initialisation and of the noise; the figures above are this seed's.
SEED = 0
DAMAGED = "model.layers.0.mlp.down_proj"
TUNED = "model.layers.1.self_attn.v_proj"
# Task A: short question-and-answer pairs, scored on the answers.
TASK_A = [
    ("What is 2+2?", "4"),
    ("What is 3+5?", "8"),
    ("Capital of France?", "Paris"),
    ("Opposite of hot?", "cold"),
    ("Colour of grass?", "green"),
    ("First letter?", "A"),
    ("Legs on a cat?", "four"),
    ("Days in a week?", "seven"),
]
# Plain prose the source learns besides task A, so that it reads text at all.
PROSE = [
    "the lazy dog sleeps in the warm sun",
    "a quiet brown fox walks over the hill",
    "my old cat naps by the open door",
    "we sing a long song in the dark night",
    "she reads a good book on the train",
    "he jumps over the small red fence",
]
# Task B: plain text of another kind (words of the letters the others rarely use), scored on every token
# after the first: a module can learn it quickly, and a module that did loses it when transplanted back.
TASK_B = [
    "zq jx qz xz zq xq jz",
    "qx zz jq xj zx qq zj",
    "jj xq zx qz jx zq xx",
    "zx qj xz jq zz xq qz",
    "xq jz zq qx jj zx xz",
    "qz xx jq zj xq zz qj",
]


@dataclass(frozen=True)
class Tradeoff:
    """The pair, its two workloads (paths, as `--workload` and `--keep` take them) and the modules changed."""

    source: Path
    target: Path
    task: str
    keep: str
    damaged: str = DAMAGED
    tuned: str = TUNED


def _nll(model, gold: GoldSet) -> torch.Tensor:
    """The mean NLL of `gold`'s solutions, differentiable: the loss the ranking measures."""
    return solution_nll(model, gold.prompts, gold.solutions, gold.pad_id).mean()


def _train(loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()


def build_tradeoff(root: Path) -> Tradeoff:
    """Write the source, the target and the two workloads under `root` (which must be empty or new).

    Args:
        root: the folder to write into.

    Returns:
        Where everything is, and which modules were changed.
    """
    root.mkdir(parents=True, exist_ok=True)
    task, keep = root / "task.jsonl", root / "keep.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "solution": s}) + "\n" for p, s in TASK_A))
    keep.write_text("".join(json.dumps({"text": t}) + "\n" for t in TASK_B))
    base = model_with_tokenizer(root / "base", SEED)
    tokenizer = load_tokenizer(base)
    gold_a, gold_b = (encode_gold(tokenizer, load_workload(str(w)), True) for w in (task, keep))
    prose = encode_gold(tokenizer, PromptSet("prose", ("",) * len(PROSE), tuple(PROSE), "plain"), True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(base)
        everything = torch.optim.Adam(model.parameters(), lr=1e-2)
        _train(lambda: _nll(model, gold_a) + _nll(model, prose), everything, steps=20)
        source = root / "source"
        model.save_pretrained(source)
        one = torch.optim.Adam(model.get_submodule(TUNED).parameters(), lr=1e-2)
        _train(lambda: _nll(model, gold_b), one, steps=5)
        with torch.no_grad():
            w = model.get_submodule(DAMAGED).weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(SEED)) * 2 * w.std())
        target = root / "target"
        model.save_pretrained(target)
    finally:
        torch.set_num_threads(threads)
    save_tokenizer(source)
    save_tokenizer(target)
    return Tradeoff(source, target, str(task), str(keep))
