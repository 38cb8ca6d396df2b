"""Read a checkpoint's tensors by name, and swap a source's tensors into a loaded model in memory.

What `sweep`, `select`, `swap-nll` and `taylor` use instead of writing a checkpoint per selection:
the source is read with `pread`, one tensor at a time, so its pages never count toward the
process's memory. A swap may blend (`alpha`), with the formula `transplant --alpha` writes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from surgery.checkpoints.folder import Checkpoint
from surgery.checkpoints.streaming import ReadOnlyFiles, blend, check_alpha, read_tensor


class TensorReader(ReadOnlyFiles):
    """`reader[name]`: one tensor of `checkpoint`, freshly read; files stay open until the `with` block ends."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__()
        self.checkpoint = checkpoint

    def __enter__(self) -> TensorReader:
        return self

    def __getitem__(self, name: str) -> torch.Tensor:
        ref = self.checkpoint.tensors[name]
        info = ref.info
        return read_tensor(self.fd(ref.shard.path), ref.offset, info.nbytes, info.dtype, info.shape)


@contextmanager
def swapped(model: torch.nn.Module, source: Checkpoint, tensors: list[str], alpha: float = 1.0):
    """Temporarily replace `tensors` of `model` with the source's, or blend them with it; restore the
    originals exactly when the `with` block ends (an exception included).

    With `alpha` 1 each parameter becomes the source's tensor cast to its dtype. Below 1 (0 < alpha < 1)
    it becomes `param + alpha * (source - param)`, computed in float32 on the parameter's device and
    rounded to its dtype (`streaming.blend`): bit for bit what `transplant --alpha` writes, when the model
    holds the target's weights in the target's dtypes (a model loaded in another dtype blends its own).

    Raises:
        SurgeryError: `alpha` outside (0, 1]; the model is left as it was.
    """
    check_alpha(alpha)
    params = dict(model.named_parameters())
    saved = {t: params[t].detach().clone() for t in tensors}
    try:
        with TensorReader(source) as reader, torch.no_grad():
            for t in tensors:
                if alpha == 1:
                    params[t].copy_(reader[t].to(params[t].dtype))
                else:
                    params[t].copy_(blend(saved[t], reader[t].to(saved[t].device), alpha).to(params[t].dtype))
        yield
    finally:
        with torch.no_grad():
            for t, original in saved.items():
                params[t].copy_(original)
