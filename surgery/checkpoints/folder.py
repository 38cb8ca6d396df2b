"""Open a Hugging Face checkpoint folder (local, or a Hub repo id via the cache): config, shards, index, fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from surgery.checkpoints.config_check import ConfigMismatch, config_mismatches, describe
from surgery.checkpoints.files import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE
from surgery.checkpoints.header import ShardHeader, TensorInfo, brief, read_header
from surgery.checkpoints.hub_inputs import HubRef, cache_repo_folder, resolve_checkpoint
from surgery.errors import SurgeryError
from surgery.fileio import read_json_object

_SAMPLE_BYTES = 64


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: its shard and its header entry."""

    shard: ShardHeader
    info: TensorInfo

    @property
    def path(self) -> Path:
        """The file holding the tensor."""
        return self.shard.path

    @property
    def offset(self) -> int:
        """The absolute offset of the tensor's first byte in its file."""
        return self.shard.data_start + self.info.begin

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    @property
    def dtype(self) -> str:
        return self.info.dtype


@dataclass(frozen=True)
class Checkpoint:
    """A validated safetensors checkpoint folder.

    Attributes:
        path: the folder, resolved.
        config: the parsed `config.json`.
        shards: shard headers, in the order their files are named (index order).
        index: the parsed index JSON, or None for a single-file checkpoint.
        tensors: every tensor name mapped to its shard and header entry.
        hub: the Hub repo and commit the folder is a cached snapshot of, or None for a local folder.
    """

    path: Path
    config: dict
    shards: tuple[ShardHeader, ...]
    index: dict | None
    tensors: dict[str, TensorRef]
    hub: HubRef | None = None

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the config, every tensor's name, dtype and shape, and a sample of its bytes.

        Headers alone cannot tell a fine-tune from its base (same config, same shapes), so a
        few bytes from the start, middle and end of every tensor are mixed in: any real
        weight change shows, at the cost of three small reads per tensor, not a full hash.
        """
        return self.fingerprint_with({})

    def fingerprint_with(self, replaced: Mapping[str, Callable[[int, int], bytes]]) -> str:
        """The fingerprint this checkpoint would have with some tensors' bytes replaced.

        `replaced` maps a tensor name to `read(at, n)`, giving `n` bytes from byte `at` of its new bytes
        (same dtype and shape; see `streaming.cast_reader`): what a model patched in memory is
        fingerprinted by, equal to the fingerprint of the checkpoint `transplant` or `apply` would write.
        """
        h = hashlib.sha256()
        h.update(json.dumps(self.config, sort_keys=True, separators=(",", ":")).encode())
        for name in sorted(self.tensors):
            t = self.tensors[name].info
            h.update(f"\n{name}\t{t.dtype}\t{list(t.shape)}".encode())
        for shard in self.shards:
            fd = os.open(shard.path, os.O_RDONLY)
            try:
                for t in shard.tensors:
                    read = replaced.get(t.name)
                    for at in sorted({t.begin, (t.begin + t.end) // 2, max(t.begin, t.end - _SAMPLE_BYTES)}):
                        n = min(_SAMPLE_BYTES, t.end - at)
                        h.update(read(at - t.begin, n) if read else os.pread(fd, n, shard.data_start + at))
            finally:
                os.close(fd)
        return "sha256:" + h.hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(ref.info.nbytes for ref in self.tensors.values())

    @cached_property
    def config_mismatches(self) -> list[ConfigMismatch]:
        """Where `config.json` disagrees with the tensors (see `surgery.checkpoints.config_check`)."""
        return config_mismatches(self.config, {name: ref.info for name, ref in self.tensors.items()})

    def check_config(self) -> None:
        """Refuse a config that disagrees with the tensors, before anything is built from it.

        Raises:
            SurgeryError: naming the field, both values and the tensor.
        """
        if self.config_mismatches:
            raise SurgeryError(
                f"{self.path}: {self.config_mismatches[0].message()}; fix config.json to match the weights"
            )

    def summary(self) -> dict:
        """What `surgery inspect` prints: architecture, sizes, dtypes and storage."""
        # Multimodal configs keep the language model's fields in text_config.
        text_config = self.config.get("text_config")
        cfg = {**(text_config if isinstance(text_config, dict) else {}), **self.config}
        dtypes: dict[str, int] = {}
        for ref in self.tensors.values():
            dtypes[ref.info.dtype] = dtypes.get(ref.info.dtype, 0) + 1
        return {
            "path": str(self.path),
            # Only for Hub snapshots: which repo and commit the cache folder holds.
            **({"repo": f"{self.hub.repo_id}@{self.hub.commit}"} if self.hub else {}),
            "model_type": cfg.get("model_type"),
            "architectures": cfg.get("architectures"),
            "layers": cfg.get("num_hidden_layers"),
            "hidden_size": cfg.get("hidden_size"),
            "vocab_size": cfg.get("vocab_size"),
            # Absent from some configs; a checkpoint without lm_head.weight is tied in practice.
            "tied_embeddings": cfg.get("tie_word_embeddings", "lm_head.weight" not in self.tensors),
            "dtypes": dict(sorted(dtypes.items())),
            "shards": len(self.shards),
            "tensors": len(self.tensors),
            "total_bytes": self.total_bytes,
            "fingerprint": self.fingerprint,
            "config": describe(self.config_mismatches),
        }


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open and validate a checkpoint folder, or a Hub repo's snapshot in the HF cache.

    Accepts a folder with a single `model.safetensors`, or shards listed in
    `model.safetensors.index.json`. Every shard header is parsed and validated.

    Args:
        path: the checkpoint folder; or, as a str that is not an existing path,
            `org/name[@revision]` (fetched into, or read from, the HF cache; see `surgery.checkpoints.hub_inputs`).

    Returns:
        The validated checkpoint.

    Raises:
        SurgeryError: the folder is missing, the repo cannot be had, the folder holds no
            safetensors weights, or any header, index or config is malformed.
    """
    resolved = resolve_checkpoint(path)
    folder = resolved.path
    if not folder.exists():
        raise SurgeryError(f"{folder}: no such checkpoint folder; check the path")
    if not folder.is_dir():
        raise SurgeryError(f"{folder}: not a folder; pass the checkpoint folder, not a file inside it")
    folder = folder.resolve()
    check_links(folder)

    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = read_json_object(index_path, "index", "re-download the checkpoint")
        shard_names = index_shards(folder, index)
    elif (folder / SINGLE_FILE).is_file():
        index = None
        shard_names = [SINGLE_FILE]
    else:
        raise SurgeryError(_no_weights_message(folder))

    shards = tuple(read_header(folder / name) for name in shard_names)
    tensors: dict[str, TensorRef] = {}
    for shard in shards:
        for info in shard.tensors:
            if info.name in tensors:
                raise SurgeryError(
                    f"{folder}: tensor {brief(info.name)} appears in both {tensors[info.name].shard.path.name} "
                    f"and {shard.path.name}; the checkpoint is corrupt"
                )
            tensors[info.name] = TensorRef(shard, info)
    if index is not None:
        _check_index_matches(folder, index, tensors)

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SurgeryError(f"{folder}: no config.json; a Hugging Face checkpoint folder needs one")
    config = read_json_object(config_path, "config", "re-download the checkpoint")
    return Checkpoint(path=folder, config=config, shards=shards, index=index, tensors=tensors, hub=resolved.hub)


def check_links(folder: Path) -> None:
    """Refuse a symlink anywhere in `folder` that leads out of it.

    A hostile checkpoint could otherwise make surgery read any file the user can read, and
    `transplant` copy it into an output that may then be pushed to the Hub. A Hub cache snapshot
    is the exception: its files are links into its repo's `blobs/` folder, which is allowed.

    Args:
        folder: the checkpoint folder, resolved.

    Raises:
        SurgeryError: naming the first link that leaves the folder (or loops).
    """
    allowed = [folder]
    repo = cache_repo_folder(folder)
    if repo is not None:
        allowed.append(repo / "blobs")
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            link = Path(root, name)
            if not link.is_symlink():
                continue
            try:
                dest = link.resolve()
            except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError on a loop, 3.13 OSError
                raise SurgeryError(f"{link}: a symlink loop; the checkpoint is corrupt, re-download it") from None
            if not any(dest == a or a in dest.parents for a in allowed):
                raise SurgeryError(
                    f"{link}: a symlink to {dest}, outside the checkpoint folder; refusing to follow it, "
                    "copy the file into the folder if you trust it"
                )


def index_shards(folder: Path, index: dict, index_name: str = INDEX_FILE) -> list[str]:
    """Shard file names from an index, sorted, each checked to be a plain name of an existing file."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SurgeryError(f"{folder / index_name}: no weight_map; the index is corrupt")
    names: list[str] = []
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not _is_plain_file_name(name):
            raise SurgeryError(
                f"{folder / index_name}: tensor {brief(tensor)} names shard {brief(name)}, which is not a plain "
                "file name inside the checkpoint folder; refusing a path outside it"
            )
        if name not in names:
            names.append(name)
    for name in names:
        if not (folder / name).is_file():
            raise SurgeryError(
                f"{folder}: index names shard {brief(name)}, which is missing; re-download the checkpoint"
            )
    return sorted(names)


def _is_plain_file_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not Path(name).is_absolute()
    )


def _check_index_matches(folder: Path, index: dict, tensors: dict[str, TensorRef]) -> None:
    weight_map: dict[str, str] = index["weight_map"]
    for name, shard_name in weight_map.items():
        ref = tensors.get(name)
        if ref is None or ref.shard.path.name != shard_name:
            raise SurgeryError(
                f"{folder / INDEX_FILE}: tensor {brief(name)} is listed in {shard_name} but is not there; "
                "the index and shards disagree, re-download the checkpoint"
            )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        raise SurgeryError(
            f"{folder / INDEX_FILE}: tensor {brief(extra[0])} is in a shard but not in the index; "
            "the index and shards disagree, re-download the checkpoint"
        )


def _no_weights_message(folder: Path) -> str:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        # Unpickling can run code, so the fix is an explicit, separate step the user opts into.
        return (
            f"{folder}: only pickle weights ({', '.join(pickles[:3])}); surgery requires safetensors. Convert with: "
            f"surgery import-pickle {folder} -o {folder}-safetensors --allow-pickle (only if you trust the files)"
        )
    return f"{folder}: no model.safetensors or {INDEX_FILE}; pass a Hugging Face checkpoint folder"
