"""The per-model activation statistics file written by `surgery profile`.

A safetensors file: for each module, `<module>::mean` (float64 scalar, the paper's mean
over steps and prompts) and `<module>::per_prompt` (float64 [P], the mean per prompt),
plus `steps` (int64 [P], the decoding steps counted per prompt). `__metadata__["surgery"]`
holds JSON: model fingerprint, workload, settings and library versions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from surgery.checkpoints.header import TensorInfo, encode_header, read_header
from surgery.errors import SurgeryError
from surgery.fileio import write_atomic

FORMAT = "surgery-stats/1"


@dataclass(frozen=True)
class ModelInfo:
    """The profiled checkpoint: its path when profiled, and its fingerprint."""

    path: str
    fingerprint: str


@dataclass(frozen=True)
class WorkloadInfo:
    """The prompts: the workload's name, the sha256 of its prompts, and their count."""

    name: str
    sha256: str
    prompts: int


@dataclass(frozen=True)
class ProfileSettings:
    """What was used: the decoding budget, whether a chat template was applied, and the compute dtype."""

    max_new_tokens: int
    chat: bool
    dtype: str


@dataclass(frozen=True)
class Requested:
    """What was asked for (`dtype="auto"` resolves to the checkpoint's), to match a cached file to a request."""

    chat: bool
    dtype: str


@dataclass(frozen=True)
class StatsMeta:
    """The JSON metadata of a stats file (`__metadata__["surgery"]`), typed.

    Two stats files can be compared only if their `workload` and `settings` are equal.
    `requested` is None in files written before it was recorded.
    """

    model: ModelInfo
    workload: WorkloadInfo
    settings: ProfileSettings
    requested: Requested | None
    modules: tuple[str, ...]
    batch_size: int
    versions: dict[str, str]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = list(self.modules)
        if self.requested is None:
            del d["requested"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StatsMeta:
        """Build from the file's JSON; raises KeyError/TypeError on a malformed object (the caller words the error)."""
        requested = d.get("requested")
        return cls(
            model=ModelInfo(**d["model"]),
            workload=WorkloadInfo(**d["workload"]),
            settings=ProfileSettings(**d["settings"]),
            requested=Requested(**requested) if requested is not None else None,
            modules=tuple(d["modules"]),
            batch_size=d.get("batch_size", 0),
            versions=dict(d.get("versions", {})),
        )


@dataclass(frozen=True)
class Stats:
    """Activation statistics of one model on one workload.

    Attributes:
        meta: model fingerprint, workload, settings, versions.
        mean: module -> mean |y| over all counted steps of all prompts.
        per_prompt: module -> mean |y| per prompt, shape [P].
        steps: decoding steps counted per prompt, shape [P].
    """

    meta: StatsMeta
    mean: dict[str, float]
    per_prompt: dict[str, torch.Tensor]
    steps: torch.Tensor

    @property
    def modules(self) -> list[str]:
        return list(self.mean)


def save_stats(stats: Stats, path: str | Path) -> None:
    """Write a stats file atomically: an interrupted run leaves no file that looks complete."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {"steps": stats.steps.to(torch.int64).contiguous()}
    for name in stats.modules:
        tensors[f"{name}::mean"] = torch.tensor(stats.mean[name], dtype=torch.float64)
        tensors[f"{name}::per_prompt"] = stats.per_prompt[name].to(torch.float64).contiguous()
    meta = {"format": "pt", "surgery": json.dumps({**stats.meta.to_dict(), "format": FORMAT}, sort_keys=True)}
    # Our own encoder, not safetensors.save_file: that one orders __metadata__ keys by a hash
    # map, so the same stats would give different bytes from run to run.
    infos, blobs, offset = [], [], 0
    for name in sorted(tensors):
        data = tensors[name].numpy().tobytes()
        dtype = {torch.float64: "F64", torch.int64: "I64"}[tensors[name].dtype]
        infos.append(TensorInfo(name, dtype, tuple(tensors[name].shape), offset, offset + len(data)))
        blobs.append(data)
        offset += len(data)
    write_atomic(path, encode_header(infos, meta) + b"".join(blobs))


def load_stats(path: str | Path) -> Stats:
    """Read and validate a stats file.

    Raises:
        SurgeryError: the file is missing, corrupt, or not a surgery stats file.
    """
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{path}: no such stats file; create it with `surgery profile`")
    header = read_header(path)
    try:
        meta = json.loads(header.metadata.get("surgery", ""))
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SurgeryError(f"{path}: not a surgery stats file ({FORMAT}); create it with `surgery profile`")
    try:
        typed = StatsMeta.from_dict(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise SurgeryError(f"{path}: corrupt stats metadata ({e}); create it again with `surgery profile`") from None
    with safe_open(path, "pt") as f:
        steps = f.get_tensor("steps")
        mean = {m: f.get_tensor(f"{m}::mean").item() for m in typed.modules}
        per_prompt = {m: f.get_tensor(f"{m}::per_prompt") for m in typed.modules}
    return Stats(meta=typed, mean=mean, per_prompt=per_prompt, steps=steps)
