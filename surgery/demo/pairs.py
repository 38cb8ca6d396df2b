"""Build a source/target pair from one base model with a short, seeded fine-tune.

The demo's recipe (`math-sft`): the SOURCE is the base fine-tuned on GSM8K **train** solutions, in
the exact zero-shot prompt format `surgery eval` uses; the TARGET is the base. Plain AdamW on the
CPU, embeddings frozen. Nothing here touches the test split: the evaluation's problems stay held out.

Chosen by measurement (SmolLM2-135M-Instruct, gold-solution NLL on 40 GSM8K test problems, seed 42):
the base scores 1.3248 nats/token; 20 steps of batch 4 at lr 1e-4 bring the source to 1.0609
(~4 min on 2 cores). The other candidate as the demo's pair, "a bad update" (the base fine-tuned on
unrelated text, Python's standard-library docs, 10 steps at lr 1e-4), did not degrade math at all
(1.3134).

`ADDITION_SFT` is the demo's pair since GSM8K left SmolLM2-135M at the floor (0-2 of 40 problems
whatever the pair, so accuracy never moved): the base fine-tuned on two-digit additions of the train
split (`surgery.data.addition_rows`, generated, disjoint from the 500 test problems), in the eval's
GSM8K-style prompt. Measured on 100 test problems (seed 42, 64 new tokens, bfloat16): the base solves
0 (it explains the order of operations and runs out of tokens), the source after 20 steps of batch 4
at lr 1e-4 solves 46 [36.6, 55.7].

`QWEN_ROLLBACK` is the 1.5B pair: Qwen2.5-Coder-1.5B-Instruct is the source and the target is it after
"a bad update", 16 AdamW steps (batch 4, lr 1e-4, 256 tokens) on standard-library docstrings, in
bfloat16, training only the MLP up and down projections (the issue's trial: at 3e-5 for 12 steps
accuracy stayed within noise, at 3e-4 the loss diverged). The fine-tune took 12.6 min at 13.1 GiB peak
RSS on 2 busy cores, and 7.6 min on 2 quiet AVX512-BF16 cores. Measured on 100 GSM8K test problems
(seed 42, 384 new tokens, bfloat16): the source solves 62 [52.2, 70.9], the target 39 [30.0, 48.8], a
23-point gap, while the target's gold-solution NLL is lower (0.8196 against 0.8751): judge this pair
by accuracy.

`ROLLBACK` is the study's second pair, the scenario the method was made for: the math-tuned model
is the SOURCE, and the TARGET is that model after an update on unrelated text (standard-library
docstrings) strong enough to undo part of its math gain; see bench/study.py. Measured the same way,
30 steps of batch 8 at lr 3e-4 (the one setting tried; 6.4 min of fine-tuning) take the source's 1.0609 to 1.1452:
about a third of the math-sft gain undone.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from surgery.checkpoints.staging import staged_folder
from surgery.data import addition_rows, read_jsonl_gz, stdlib_docstrings, strip_calculator
from surgery.evaluation.benchmarks import Problem, prompt_messages

RECIPE_FILE = "demo_recipe.json"


@dataclass(frozen=True)
class Recipe:
    """A seeded fine-tune; any change in these fields rebuilds the cached pair.

    `data` is "gsm8k-train" (prompt + gold solution, loss on the solution) or "stdlib-docs"
    (plain text, loss on every token). `tuned_role` says which side of the pair the fine-tuned
    model plays; the model it started from plays the other.
    """

    name: str = "math-sft"
    data: Literal["gsm8k-train", "addition-train", "stdlib-docs"] = "gsm8k-train"
    tuned_role: Literal["source", "target"] = "source"
    steps: int = 20
    batch_size: int = 4
    lr: float = 1e-4
    max_tokens: int = 320
    seed: int = 0
    # What is trained: every block weight ("blocks"; embeddings stay frozen), or only the MLP up and
    # down projections ("mlp-up-down"), which keeps a 1.5B model's gradients and AdamW state in 24 GiB.
    train: Literal["blocks", "mlp-up-down"] = "blocks"
    # The weights' dtype while training (and as saved): bfloat16 halves memory and is 4-5x faster on
    # CPUs with AVX512-BF16.
    dtype: Literal["float32", "bfloat16"] = "float32"


# The first demo's pair and the study's (see the module docstring): the base taught GSM8K; the base is the target.
MATH_SFT = Recipe()

# The demo's pair (see the module docstring): the base taught two-digit addition; the base is the target.
ADDITION_SFT = Recipe(name="addition-sft", data="addition-train", steps=20, batch_size=4, lr=1e-4, max_tokens=128)

# The study's second pair (see the module docstring); its base is the math-sft source.
ROLLBACK = Recipe(
    name="stdlib-update", data="stdlib-docs", tuned_role="target", steps=30, batch_size=8, lr=3e-4, max_tokens=128
)

# The 1.5B pair (Qwen2.5-Coder-1.5B-Instruct as the source, the same model after a bad update as the
# target); chosen by measurement (see the module docstring).
QWEN_ROLLBACK = Recipe(
    name="qwen-stdlib-update",
    data="stdlib-docs",
    tuned_role="target",
    steps=16,
    batch_size=4,
    lr=1e-4,
    max_tokens=256,
    train="mlp-up-down",
    dtype="bfloat16",
)


def _doc_examples(tokenizer, rng: random.Random, count: int) -> list[tuple[list[int], int]]:
    """`count` standard-library docstrings (over 200 characters) as (tokens, 0): loss on every token."""
    texts = stdlib_docstrings()
    rng.shuffle(texts)
    if len(texts) < count:
        raise ValueError(f"the recipe needs {count} docstrings but only {len(texts)} were found; lower its steps")
    return [(tokenizer(t)["input_ids"], 0) for t in texts[:count]]


def _math_examples(tokenizer, rng: random.Random, count: int) -> list[tuple[list[int], int]]:
    """`count` GSM8K train problems as (tokens, prompt length): the eval's zero-shot prompt, then the gold solution."""
    rows = [(r["question"], strip_calculator(r["answer"]).strip()) for r in read_jsonl_gz("gsm8k-train.jsonl.gz")]
    return _sft_examples(tokenizer, rows, rng, count)


def _addition_examples(tokenizer, rng: random.Random, count: int) -> list[tuple[list[int], int]]:
    """`count` two-digit additions of the train split, in the same form as `_math_examples`."""
    return _sft_examples(tokenizer, [(r["question"], r["solution"]) for r in addition_rows("train")], rng, count)


def _sft_examples(
    tokenizer, rows: list[tuple[str, str]], rng: random.Random, count: int
) -> list[tuple[list[int], int]]:
    """(tokens, prompt length) per (question, solution): the eval's zero-shot GSM8K-style prompt, then the solution."""
    rng.shuffle(rows)
    examples = []
    for question, solution in rows[:count]:
        messages = prompt_messages(Problem("", question, "", ""), "gsm8k", 0)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": solution}], tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        examples.append((ids, len(p_ids)))
    return examples


def _batches(examples: list[tuple[list[int], int]], recipe: Recipe, pad_id: int):
    """Endless (input_ids, attention_mask, labels) batches; labels are -100 on prompts and padding."""
    import torch

    i = 0
    while True:
        batch = [examples[(i + j) % len(examples)] for j in range(recipe.batch_size)]
        i += recipe.batch_size
        width = min(recipe.max_tokens, max(len(ids) for ids, _ in batch))
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, (ids, prompt_len) in enumerate(batch):
            ids = ids[:width]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        yield input_ids, mask, labels


def finetune(base: Path, out: Path, recipe: Recipe, log: Callable[[str], None] = print) -> None:
    """Fine-tune `base` by `recipe` and save it to `out` (written beside it, then renamed).

    Args:
        base: a checkpoint folder with a chat-template tokenizer.
        out: the folder to create.
        recipe: data, steps, batch size, learning rate and seed.
        log: where progress lines go.
    """
    # Imported here: the pairs are listed (`surgery demo --help`) without torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.checkpoints.loading import transformers_bars

    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    with transformers_bars(progress=True):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, recipe.dtype), local_files_only=True)
    model.train()
    # Embeddings (tied to the head in SmolLM2) stay frozen: they are not transplant candidates, so
    # the update lands in the modules a transplant can move, and their 28 M-parameter gradient
    # (the largest single matmul of the backward pass) is skipped.
    model.get_input_embeddings().weight.requires_grad_(False)
    if recipe.train == "mlp-up-down":
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith(("mlp.up_proj.weight", "mlp.down_proj.weight")))
    make_examples = {
        "gsm8k-train": _math_examples,
        "addition-train": _addition_examples,
        "stdlib-docs": _doc_examples,
    }[recipe.data]
    examples = make_examples(tokenizer, rng, recipe.steps * recipe.batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for step, (ids, mask, labels) in zip(range(1, recipe.steps + 1), _batches(examples, recipe, pad), strict=False):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == recipe.steps:
            log(f"  {recipe.name} step {step}/{recipe.steps}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f} s")
    model.eval()
    with staged_folder(out, overwrite=True) as tmp, transformers_bars(progress=True):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps(asdict(recipe), indent=2) + "\n")


def build_pair(base: Path, folder: Path, recipe: Recipe, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Return (source, target) for `recipe`, fine-tuning only when the cached one is missing or stale.

    Args:
        base: the base checkpoint folder (SmolLM2-135M-Instruct in the demo).
        folder: where the fine-tuned model is cached, as `folder/<recipe name>`.
        recipe: the fine-tune.
        log: where progress lines go.

    Returns:
        (source, target) folders: the tuned model and `base`, in the order `recipe.tuned_role` says.
    """
    tuned = folder / recipe.name
    stamp = tuned / RECIPE_FILE
    # A stamp written before a field existed was made with that field's default.
    defaults = asdict(Recipe())
    if stamp.is_file() and {**defaults, **json.loads(stamp.read_text())} == asdict(recipe):
        log(f"pair: reusing {tuned} (recipe unchanged)")
    else:
        fields = ", ".join(f"{k} {v}" for k, v in asdict(recipe).items() if k != "name")
        log(f"pair: fine-tuning {base.name} with recipe {recipe.name} ({fields}) -> {tuned}")
        finetune(base, tuned, recipe, log)
    return (tuned, base) if recipe.tuned_role == "source" else (base, tuned)
