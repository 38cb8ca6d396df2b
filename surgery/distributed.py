"""Data parallelism under `torchrun` / `accelerate launch`: every rank takes a share, rank 0 writes.

`eval`, `profile` (and so `analyze`) and the `taylor` ranking split their problems by index
(i % WORLD_SIZE == RANK); sums and counts are all-reduced, so the result equals a single process's.
Plain runs are world size 1 and never touch torch.distributed.
"""

from __future__ import annotations

import atexit
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def dist_info() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when run plainly."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init(world: int) -> None:
    """Join the launcher's process group (gloo on CPU, nccl on GPUs) once."""
    import torch

    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        # Leave the group while Python is still whole: a gloo worker thread that still holds tensors when
        # the interpreter shuts down aborts the process (SIGABRT; seen once in our torchrun test, and
        # described in pytorch/pytorch#179291).
        atexit.register(_leave)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _leave() -> None:
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(world: int) -> None:
    import torch

    if world > 1:
        torch.distributed.barrier()


def mine(count: int, rank: int, world: int) -> list[int]:
    """The indices of `count` items this rank takes."""
    return [i for i in range(count) if i % world == rank]


def all_sum(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place; unchanged when run plainly."""
    import torch

    if world > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor
