"""sha256 of a checkpoint's tensors, cached per shard file between runs.

A patch records the sha256 of every target tensor it replaces, and hashing them means reading them
(measured on a 3.93 GiB pair read from disk, K = 32: a first patch 2.38-3.05 s, a later one with the
digests cached 1.38-2.27 s). Patches against one target are
many (one base, many patches; a K sweep), and the target does not change between them, so each
shard's digests are cached under `digests/` in surgery's cache folder (see `cache.py`), keyed by
the file's identity: device, inode, size, mtime and ctime. Rewriting a file, replacing it or even
touching it changes that identity, and its old digests are never used again.

A file modified in the same clock tick as it was hashed could keep its mtime (git's "racy" case),
so digests are cached only for a file whose mtime is older than `SETTLED_NS` and whose identity
did not change while it was hashed.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from surgery.checkpoints.cache import cache_file, read_entry, write_entry
from surgery.checkpoints.folder import Checkpoint
from surgery.checkpoints.streaming import ReadOnlyFiles, sha256_range

# A file last modified this long ago is not being written as it is hashed.
SETTLED_NS = 2 * 10**9


def tensor_digests(
    ckpt: Checkpoint, names: Sequence[str], *, use_cache: bool = True, known: Mapping[str, str] | None = None
) -> dict[str, str]:
    """sha256 of each named tensor's bytes in `ckpt`, from the cache where the shard is unchanged.

    Args:
        use_cache: False hashes every tensor (a check that must read the bytes: `apply`). Either way
            the digests computed are added to the cache for the next run.
        known: digests read from the cache a moment ago (`cached_digests`), before something of our
            own changed the files' identity but not their bytes: a hard link to them changes their
            ctime. They are used as cached ones and stored under the files' new identity.
    """
    out: dict[str, str] = {}
    with ReadOnlyFiles() as files:
        for path, group in _by_shard(ckpt, names).items():
            fd = files.fd(path)
            identity = _identity(fd)
            entry = cache_file("digests", hashlib.sha256(repr(identity).encode()).hexdigest())
            stored = _read(entry, identity)
            carried = {n: known[n] for n in group if known and n in known and n not in stored}
            cached = {**carried, **stored}
            hashed = {}
            for n in group:
                if not (use_cache and n in cached):
                    ref = ckpt.tensors[n]
                    hashed[n] = sha256_range(fd, ref.offset, ref.nbytes)
            digests = {**cached, **hashed}
            settled = time.time_ns() - identity[3] > SETTLED_NS
            if (hashed or carried) and settled and _identity(fd) == identity:
                write_entry(entry, {"file": str(path), "identity": list(identity), "tensors": digests})
            out.update((n, digests[n]) for n in group)
    return {n: out[n] for n in names}


def cached_digests(ckpt: Checkpoint, names: Sequence[str]) -> dict[str, str]:
    """The digests the cache holds for these tensors as their files are now; nothing is hashed."""
    out: dict[str, str] = {}
    with ReadOnlyFiles() as files:
        for path, group in _by_shard(ckpt, names).items():
            identity = _identity(files.fd(path))
            stored = _read(cache_file("digests", hashlib.sha256(repr(identity).encode()).hexdigest()), identity)
            out.update((n, stored[n]) for n in group if n in stored)
    return out


def _by_shard(ckpt: Checkpoint, names: Sequence[str]) -> dict[Path, list[str]]:
    by_shard: dict[Path, list[str]] = {}
    for n in names:
        by_shard.setdefault(ckpt.tensors[n].shard.path, []).append(n)
    return by_shard


def _identity(fd: int) -> tuple[int, int, int, int, int]:
    """What changes whenever the file's bytes may have: (device, inode, size, mtime_ns, ctime_ns)."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read(entry: Path, identity: tuple[int, ...]) -> dict[str, str]:
    """The cached digests of the file with this identity; empty when there are none (or they are unreadable)."""
    obj = read_entry(entry)
    if not isinstance(obj, dict) or obj.get("identity") != list(identity) or not isinstance(obj.get("tensors"), dict):
        return {}
    return {k: v for k, v in obj["tensors"].items() if isinstance(v, str) and len(v) == 64}
