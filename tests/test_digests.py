"""The per-shard cache of tensor sha256 (`tensor_digests`): hits, misses, and who may trust it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from surgery import open_checkpoint, transplant, verify
from surgery.checkpoints import digests
from surgery.checkpoints.digests import tensor_digests
from tests.helpers import cli, make_model

NAMES = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]  # two shards


def settle(folder: Path) -> None:
    """Date every file an hour back, as a checkpoint downloaded or saved earlier would be."""
    then = time.time() - 3600
    for p in folder.iterdir():
        os.utime(p, (then, then))


def true_digests(folder: Path, names: list[str]) -> dict[str, str]:
    ckpt = open_checkpoint(folder)
    out = {}
    for n in names:
        ref = ckpt.tensors[n]
        with open(ref.shard.path, "rb") as f:
            f.seek(ref.offset)
            out[n] = hashlib.sha256(f.read(ref.info.nbytes)).hexdigest()
    return out


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = make_model(tmp_path / "m", 1, shard="20KB")
    settle(folder)
    return folder


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the tensors `tensor_digests` actually reads and hashes."""
    calls: list[int] = []
    real = digests.sha256_range

    def counted(fd: int, offset: int, n: int) -> str:
        calls.append(n)
        return real(fd, offset, n)

    monkeypatch.setattr(digests, "sha256_range", counted)
    return calls


def test_digests_are_hashed_once_then_read_from_the_cache(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting(monkeypatch)
    want = true_digests(model, NAMES)
    assert tensor_digests(open_checkpoint(model), NAMES) == want
    assert len(calls) == 2
    assert tensor_digests(open_checkpoint(model), NAMES) == want
    assert len(calls) == 2  # nothing read the second time
    # A tensor not asked for before is hashed and added; the others still come from the cache.
    more = [*NAMES, "model.layers.1.mlp.up_proj.weight"]
    assert tensor_digests(open_checkpoint(model), more) == true_digests(model, more)
    assert len(calls) == 3


def test_a_rewritten_or_touched_shard_is_hashed_again(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting(monkeypatch)
    tensor_digests(open_checkpoint(model), NAMES)
    assert len(calls) == 2
    # Same bytes, same mtime, but the inode's ctime moved: the identity changed, so nothing is trusted.
    shard = open_checkpoint(model).tensors[NAMES[0]].shard.path
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tensor_digests(open_checkpoint(model), NAMES) == true_digests(model, NAMES)
    assert len(calls) == 3  # only the touched shard's tensor was read again


def test_a_check_that_reads_everything_keeps_the_other_cached_digests(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = "model.layers.1.mlp.up_proj.weight"  # in the same shard as NAMES[1]
    tensor_digests(open_checkpoint(model), [*NAMES, up])
    calls = counting(monkeypatch)
    assert tensor_digests(open_checkpoint(model), NAMES[1:], use_cache=False) == true_digests(model, NAMES[1:])
    assert len(calls) == 1  # read although cached
    assert tensor_digests(open_checkpoint(model), [up]) == true_digests(model, [up])
    assert len(calls) == 1  # the shard's entry still holds the tensor the check did not ask for


def test_a_file_written_just_now_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = make_model(tmp_path / "fresh", 1, shard="20KB")  # mtime now: it may still be being written
    calls = counting(monkeypatch)
    tensor_digests(open_checkpoint(fresh), NAMES)
    tensor_digests(open_checkpoint(fresh), NAMES)
    assert len(calls) == 4
    assert not list((Path(os.environ["SURGERY_CACHE"]) / "digests").glob("*.json"))


def test_an_unreadable_or_foreign_entry_is_ignored_and_rewritten(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensor_digests(open_checkpoint(model), NAMES)
    entries = sorted((Path(os.environ["SURGERY_CACHE"]) / "digests").glob("*.json"))
    assert len(entries) == 2  # one per shard read
    entries[0].write_text("{not json")
    obj = json.loads(entries[1].read_text())
    entries[1].write_text(json.dumps({**obj, "identity": [0, 0, 0, 0, 0]}))  # another file's digests
    calls = counting(monkeypatch)
    assert tensor_digests(open_checkpoint(model), NAMES) == true_digests(model, NAMES)
    assert len(calls) == 2
    assert all(json.loads(e.read_text())["identity"][2] > 0 for e in entries)


def test_apply_reads_the_target_whatever_the_cache_says(tmp_path: Path, model: Path) -> None:
    """A wrong cache entry may only make a patch's record wrong (apply then refuses); never a wrong output."""
    src = make_model(tmp_path / "src", 2, shard="20KB")
    modules = [a for m in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj") for a in ("--module", m)]
    made = cli("transplant", "-t", model, "-s", src, "-o", tmp_path / "p", "--patch", "-q", *modules)
    assert made.exit_code == 0, made.output
    record = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert {t["name"]: t["target_sha256"] for t in record["tensors"]} == true_digests(model, NAMES)
    # Poison the cache: every cached target digest now names other bytes.
    for entry in (Path(os.environ["SURGERY_CACHE"]) / "digests").glob("*.json"):
        obj = json.loads(entry.read_text())
        entry.write_text(json.dumps({**obj, "tensors": dict.fromkeys(obj["tensors"], "0" * 64)}))
    applied = cli("apply", tmp_path / "p", "-t", model, "-o", tmp_path / "out", "-q")
    assert applied.exit_code == 0, applied.output
    # apply hashed the target itself, and put the true digests back in the cache.
    cached = {}
    for entry in (Path(os.environ["SURGERY_CACHE"]) / "digests").glob("*.json"):
        cached.update(json.loads(entry.read_text())["tensors"])
    assert {n: cached[n] for n in NAMES} == true_digests(model, NAMES)


def test_a_wrong_cache_entry_can_only_make_apply_refuse(tmp_path: Path, model: Path) -> None:
    src = make_model(tmp_path / "src", 2, shard="20KB")
    tensor_digests(open_checkpoint(model), NAMES)
    for entry in (Path(os.environ["SURGERY_CACHE"]) / "digests").glob("*.json"):
        obj = json.loads(entry.read_text())
        entry.write_text(json.dumps({**obj, "tensors": dict.fromkeys(obj["tensors"], "0" * 64)}))
    modules = [a for m in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj") for a in ("--module", m)]
    made = cli("transplant", "-t", model, "-s", src, "-o", tmp_path / "p", "--patch", "-q", *modules)
    assert made.exit_code == 0, made.output
    applied = cli("apply", tmp_path / "p", "-t", model, "-o", tmp_path / "out", "-q")
    assert applied.exit_code == 2
    assert "differs from the target this patch was made for" in applied.output
    assert not (tmp_path / "out").exists()


def test_a_second_link_of_a_target_hashes_none_of_its_linked_shards(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hard link changes the target files' ctime (part of the cache key): the digests found before
    # linking must be stored again under the files' new identity, or every --link run hashes them again.
    source = make_model(tmp_path / "s", 2, shard="20KB")
    calls = counting(monkeypatch)
    first = transplant(target=model, source=source, out=tmp_path / "a", modules=["model.layers.1.mlp.*"], link=True)
    assert first.linked_shards and calls, "the first --link run hashes the linked shards"
    calls.clear()
    second = transplant(target=model, source=source, out=tmp_path / "b", modules=["model.layers.1.mlp.*"], link=True)
    assert second.linked_shards == first.linked_shards
    assert calls == [], "the second --link run read the linked shards again"
    record = json.loads((tmp_path / "b" / "transplant.json").read_text())
    assert record["linked_sha256"] == json.loads((tmp_path / "a" / "transplant.json").read_text())["linked_sha256"]
    assert record["linked_sha256"] == true_digests(model, list(record["linked_sha256"]))
    assert verify(tmp_path / "b").tensors_checked == 21
