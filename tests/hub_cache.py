"""A real huggingface_hub cache folder, laid out by hand, and an offline Hub for the tests that use it.

The layout is the one `snapshot_download` writes:

    <cache>/models--org--name/blobs/<sha256>                  file contents
    <cache>/models--org--name/snapshots/<commit>/<file>       relative symlinks into ../../blobs
    <cache>/models--org--name/refs/<branch>                   the commit the branch points to
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import huggingface_hub.constants
import pytest


def commit_hash(label: str) -> str:
    """A 40-hex commit id, stable per label."""
    return hashlib.sha1(label.encode()).hexdigest()


def add_snapshot(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put every file of `folder` into the cache as `repo_id` at `commit`, pointed to by `refs`.

    Returns:
        The snapshot folder.
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / src.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        # Relative, as huggingface_hub makes them: the target lies outside the snapshot folder.
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Point huggingface_hub at `cache` with HF_HUB_OFFLINE=1, for this test only.

    huggingface_hub reads both variables into `constants` at import time, and its functions read
    those constants at call time, so the constants are patched (the environment too, for anything
    that reads it later). monkeypatch restores all of it after the test.
    """
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
