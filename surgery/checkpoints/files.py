"""The files of a checkpoint folder: the weight files surgery reads, and the others it copies along."""

from __future__ import annotations

from pathlib import Path

from surgery.checkpoints.staging import TMP_PREFIX

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Weight formats we recognise but never read: loading them means unpickling.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# The provenance record `surgery transplant` writes into its output.
RECORD_FILE = "transplant.json"
# The model card of an output (and of a Hub repo).
CARD_FILE = "README.md"
# Files of the target that are not copied: weights (rewritten or stale) and the model card.
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".h5", ".msgpack", *PICKLE_SUFFIXES)
_SKIPPED_NAMES = {INDEX_FILE, "pytorch_model.bin.index.json", CARD_FILE, RECORD_FILE}
_SKIPPED_DIRS = {".git", ".cache", ".huggingface"}


def is_copied_file(rel: Path) -> bool:
    """Whether a file of the target folder is copied into the output as is."""
    return (
        not any(part in _SKIPPED_DIRS for part in rel.parts[:-1])
        and rel.name not in _SKIPPED_NAMES
        and not rel.name.endswith(_WEIGHT_SUFFIXES)
        and not rel.name.startswith(TMP_PREFIX)
    )


def copied_files(folder: Path) -> list[Path]:
    """The target's non-weight files (config, tokenizer, ...), relative to `folder`."""
    return sorted(
        p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and is_copied_file(p.relative_to(folder))
    )
