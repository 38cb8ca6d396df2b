"""How a checkpoint is loaded and prompted: one set of options, the `options` argument of profile, analyze, evaluate,
sweep, select, rank and build_manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dtype = Literal["auto", "fast", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = ("auto", "fast", "float32", "bfloat16", "float16")
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelOptions:
    """Loading and prompting options, declared once (the CLI generates its flags from them).

    The RAM budget (`max_memory`) is not among them: `sweep` swaps weights in place, which an
    offloaded model cannot take, so only `profile`, `analyze` and `eval` accept it.

    Attributes:
        dtype: compute dtype; `auto` keeps the checkpoint's; `fast` is bfloat16 where the hardware runs it
            natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else float32.
        chat: apply the tokenizer's chat template when it has one.
        trust_remote_code: allow custom model code (off unless asked for).
        progress: show progress bars (only on a terminal).
        device: `auto` (the first CUDA GPU when torch sees one, else the CPU), `cpu` or `cuda`.
    """

    dtype: Dtype = "auto"
    chat: bool = True
    trust_remote_code: bool = False
    progress: bool = True
    device: Device = "auto"
