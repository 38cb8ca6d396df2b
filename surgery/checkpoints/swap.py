"""Swap a source's tensors into a loaded model, in memory, and restore the originals bit for bit.

What `sweep`, `select` and `swap-nll` use instead of writing a checkpoint per selection: the source
is read through safetensors' memory map, one tensor at a time.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from safetensors import safe_open

from surgery.checkpoints.folder import Checkpoint


@contextmanager
def swapped(model: torch.nn.Module, source: Checkpoint, tensors: list[str]):
    """Temporarily replace `tensors` of `model` with the source's; restore the originals exactly."""
    params = dict(model.named_parameters())
    saved = {t: params[t].detach().clone() for t in tensors}
    try:
        with ExitStack() as stack:
            files = {}
            with torch.no_grad():
                for t in tensors:
                    path = source.tensors[t].shard.path
                    if path not in files:
                        files[path] = stack.enter_context(safe_open(path, "pt"))
                    params[t].copy_(files[path].get_tensor(t).to(params[t].dtype))
        yield
    finally:
        with torch.no_grad():
            for t, original in saved.items():
                params[t].copy_(original)
