"""Faults: SIGKILL at random points of a real `surgery transplant`, two runs racing for one output,
what the next run does with what a killed one left, and an interrupted `profile`."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import surgery.analysis.profiling
from surgery import load_stats, profile, transplant
from surgery.checkpoints import direct_write
from surgery.checkpoints.direct_write import SyncBehind
from surgery.checkpoints.options import ModelOptions
from surgery.checkpoints.staging import LOCK_SUFFIX, TMP_PREFIX, output_lock
from surgery.errors import SurgeryError
from tests.helpers import cli, make_model, save_tokenizer, tree_digest, write_manifest
from tests.paused import spawn

KILLS = 20
SEED = 2026
# A few MB over 6 shards; -k 16 makes ~30 pieces, so the slowed copy offers many points to land in.
BIG = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "vocab_size": 1024}


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    src = make_model(root / "source", 1, shard="1MB", **BIG)
    tgt = make_model(root / "target", 2, shard="1MB", **BIG)
    return {"source": src, "target": tgt, "manifest": write_manifest(root / "m.json", src, tgt)}


def transplant_args(big_pair: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = [
        "transplant",
        "-t",
        big_pair["target"],
        "-s",
        big_pair["source"],
        "-m",
        big_pair["manifest"],
        "-k",
        "16",
        "-o",
        out,
    ]
    return [str(a) for a in [*args, "-q", *extra]]


def leftovers(folder: Path) -> list[str]:
    """What a run may leave beside its output: temp folders and the lock file."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX) or p.name.endswith(LOCK_SUFFIX))


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 60) -> float:
    """Block until `ready()` or until `proc` has exited; return the time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.002)
    return time.monotonic()


def wait_for_staging(proc: subprocess.Popen, folder: Path) -> float:
    """Block until `proc` has made its temp folder (so it holds the output lock) or has exited."""
    return wait_until(proc, lambda: any(p.name.startswith(TMP_PREFIX) for p in folder.iterdir()))


@pytest.mark.slow
def test_sigkill_at_random_points_never_corrupts_and_the_rerun_cleans_up(tmp_path: Path, big_pair: dict) -> None:
    inputs = {k: tree_digest(big_pair[k]) for k in ("source", "target")}
    out = tmp_path / "out"
    delay = 0.01
    # One full run measures how long start-up and staging (copy, fsync, publish) take under this machine's load.
    t0 = time.monotonic()
    proc = spawn(transplant_args(big_pair, out), delay)
    staged = wait_for_staging(proc, tmp_path)
    published = wait_until(proc, out.exists)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    startup, writing = staged - t0, 1.1 * (published - staged)  # a little past publishing, into the clean-up
    assert cli("verify", out, "-t", big_pair["target"], "-s", big_pair["source"]).exit_code == 0

    rng = random.Random(SEED)
    landed = {"before staging": 0, "inside staging": 0, "after publishing": 0}
    for i in range(KILLS):
        overwrite = i % 2 == 1  # every other run replaces the output the previous rerun left
        if not overwrite and out.exists():
            shutil.rmtree(out)
        proc = spawn(transplant_args(big_pair, out, *(["--overwrite"] if overwrite else [])), delay)
        # One kill in five lands at start-up (validation, planning); the rest inside or just after the copy.
        early = rng.random() < 0.2
        if early:
            time.sleep(rng.uniform(0, startup))
        else:
            wait_for_staging(proc, tmp_path)
            time.sleep(rng.uniform(0, writing))
        proc.kill()
        proc.communicate()

        left = leftovers(tmp_path)
        if any(name.startswith(TMP_PREFIX) for name in left):
            landed["inside staging"] += 1
        else:
            landed["before staging" if early else "after publishing"] += 1
        if out.exists():  # complete or absent, never half-written
            checked = cli("verify", out, "-t", big_pair["target"], "-s", big_pair["source"])
            assert checked.exit_code == 0, f"kill {i}: {checked.output}"
        assert {k: tree_digest(big_pair[k]) for k in ("source", "target")} == inputs, f"kill {i}: inputs changed"

        rerun = cli(*transplant_args(big_pair, out, "--overwrite"))
        assert rerun.exit_code == 0, f"kill {i}: {rerun.output}"
        for name in left:
            if name.startswith(TMP_PREFIX):
                assert f"note: removed {tmp_path / name}, left unfinished by an interrupted run" in rerun.stderr
        assert leftovers(tmp_path) == [], f"kill {i}: the rerun left {leftovers(tmp_path)}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # The test proves something only if kills really landed inside the copy.
    assert landed["inside staging"] >= KILLS // 2, landed


def test_two_runs_into_one_output_one_wins_the_other_fails_cleanly(tmp_path: Path, big_pair: dict) -> None:
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.touch()  # the first run stops after its first piece, inside the copy, until this file goes
    first = spawn(transplant_args(big_pair, out), hold=hold)
    try:
        wait_for_staging(first, tmp_path)
        # Whether or not they may replace an output, other runs must not write while the first one does.
        others = [spawn(transplant_args(big_pair, out, *extra)) for extra in ([], ["--overwrite"])]
        busy = f"another surgery run (pid {first.pid}) is writing {out}; wait for it to finish or choose another -o"
        for other in others:
            _, stderr = other.communicate(timeout=60)
            assert (other.returncode, stderr) == (2, f"error: {busy}\n")
        assert first.poll() is None, "the first run must still be holding its output"
    finally:
        hold.unlink()  # never leave the first run waiting forever, whatever failed
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert cli("verify", out, "-t", big_pair["target"], "-s", big_pair["source"]).exit_code == 0
    assert leftovers(tmp_path) == []


def test_sync_behind_closes_what_it_is_handed_and_reports_a_failed_fsync(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "shard", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"bytes")
    with SyncBehind() as synced:
        synced.close(fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the worker
    # An fsync that fails on the worker thread fails the write instead of vanishing with the thread.
    bad = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)
    os.close(bad)
    with pytest.raises(OSError), SyncBehind() as synced:
        synced.close(bad)


@pytest.mark.skipif(direct_write._SYNC_FILE_RANGE is None, reason="flush starts writeback with Linux's sync_file_range")
def test_sync_behind_flush_outlives_the_writers_fd_and_reports_a_failed_writeback(tmp_path: Path) -> None:
    # flush works on a duplicate: the writer may close its fd (as on an error) before the worker runs.
    fd = os.open(tmp_path / "shard", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"bytes")
    with SyncBehind() as synced:
        synced.flush(fd)
        os.close(fd)
    assert (tmp_path / "shard").read_bytes() == b"bytes"
    # sync_file_range of a pipe fails (ESPIPE); that error fails the write.
    read_end, write_end = os.pipe()
    with pytest.raises(OSError), SyncBehind() as synced:
        synced.flush(write_end)
    os.close(read_end)
    os.close(write_end)


def test_sync_behind_flush_is_skipped_where_the_filesystem_cannot_start_writeback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, offset: int, nbytes: int, flags: int) -> int:
        ctypes.set_errno(errno.ENOSYS)  # as a sandbox without the syscall answers
        return -1

    monkeypatch.setattr(direct_write, "_SYNC_FILE_RANGE", unsupported)
    fd = os.open(tmp_path / "shard", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"bytes")
    with SyncBehind() as synced:
        synced.flush(fd)
        synced.close(fd)  # the fsync at close still writes everything
    assert (tmp_path / "shard").read_bytes() == b"bytes"


def test_lock_is_exclusive_and_its_file_goes_with_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_lock(out):
        lock = tmp_path / f".out{LOCK_SUFFIX}"
        assert lock.read_text() == f"{os.getpid()}\n"
        with (
            pytest.raises(SurgeryError, match=rf"another surgery run \(pid {os.getpid()}\) is writing"),
            output_lock(out),
        ):
            pass
        assert lock.exists(), "a refused run must not remove the holder's lock"
    assert not lock.exists()
    with output_lock(out):  # free again
        pass


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_rerun_removes_only_stale_temp_folders_of_its_own_output(
    tmp_path: Path, sharded_pair: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    src, tgt = sharded_pair
    gone, alive = dead_pid(), os.getppid()
    stale = tmp_path / f"{TMP_PREFIX}out-new-{gone}-abc_12"
    running = tmp_path / f"{TMP_PREFIX}out-new-{alive}-def34"
    others = [tmp_path / f"{TMP_PREFIX}other-new-{gone}-x1", tmp_path / f"{TMP_PREFIX}out-new-{gone}-x1-new-1-y"]
    for folder in [stale, running, *others]:
        folder.mkdir()
        (folder / "model-00001-of-00007.safetensors").write_bytes(b"partial")
    transplant(target=tgt, source=src, out=tmp_path / "out", modules=["*.q_proj"], progress=False)
    err = capsys.readouterr().err
    assert not stale.exists() and f"note: removed {stale}, left unfinished by an interrupted run (pid {gone})" in err
    assert running.exists() and f"note: left {running} alone: process {alive}, which made it, is still running" in err
    assert all(p.exists() for p in others), "temp folders of other outputs are not this run's to remove"
    assert err.count("note:") == 2


def test_rerun_restores_an_output_a_killed_overwrite_had_moved_aside(
    tmp_path: Path, sharded_pair: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    src, tgt = sharded_pair
    out = tmp_path / "out"
    transplant(target=tgt, source=src, out=out, modules=["*.q_proj"], progress=False)
    before = tree_digest(out)
    # What a kill between _publish's two renames leaves: no `out`, the old one inside an `old` temp folder.
    aside = tmp_path / f"{TMP_PREFIX}out-old-{dead_pid()}-zz9"
    aside.mkdir()
    out.rename(aside / "out")
    with pytest.raises(SurgeryError, match="already exists; choose a new path or pass --overwrite"):
        transplant(target=tgt, source=src, out=out, modules=["*.k_proj"], progress=False)
    assert "note: restored" in capsys.readouterr().err
    assert tree_digest(out) == before and not aside.exists()


@pytest.fixture(scope="module")
def model_and_workload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("profile")
    model = make_model(root / "model", 1)
    save_tokenizer(model)
    workload = root / "w.jsonl"
    workload.write_text("".join(json.dumps({"prompt": f"Add {i} and {i}."}) + "\n" for i in range(4)))
    return model, workload


def test_interrupted_profile_leaves_no_stats_file(
    tmp_path: Path, model_and_workload: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, workload = model_and_workload
    out = tmp_path / "s.safetensors"
    real, calls = surgery.analysis.profiling._generate_batch, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second batch
        return real(*args, **kwargs)

    monkeypatch.setattr(surgery.analysis.profiling, "_generate_batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        profile(model, str(workload), out, max_new_tokens=2, batch_size=2, options=ModelOptions(progress=False))
    assert list(tmp_path.iterdir()) == []


def test_profile_interrupted_while_writing_keeps_the_old_stats_whole(
    tmp_path: Path, model_and_workload: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, workload = model_and_workload
    out = tmp_path / "s.safetensors"
    profile(model, str(workload), out, max_new_tokens=2, options=ModelOptions(progress=False))
    before = out.read_bytes()

    def interrupt(fd: int) -> None:
        raise KeyboardInterrupt  # after the new bytes are written, before they replace the old file

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        profile(model, str(workload), out, max_new_tokens=3, options=ModelOptions(progress=False), overwrite=True)
    monkeypatch.undo()
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    assert load_stats(out).meta.settings.max_new_tokens == 2
