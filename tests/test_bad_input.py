"""Every refused input: one line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgery.checkpoints.direct_write import OutputFile
from surgery.cli import main
from tests.helpers import BROKEN, make_model, refused, tree_digest, write_manifest


@pytest.fixture(scope="module")
def intact_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("good")
    return make_model(root / "source", 1, shard="20KB"), make_model(root / "target", 2, shard="20KB")


@pytest.mark.parametrize("command", ["inspect", "compat", "transplant", "verify"])
@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoint_is_refused_by_every_command(
    tmp_path: Path, intact_pair: tuple[Path, Path], case: str, command: str
) -> None:
    src = shutil.copytree(intact_pair[0], tmp_path / "source")
    broken = shutil.copytree(intact_pair[1], tmp_path / "broken")
    damage, message = BROKEN[case]
    damage(broken)
    args = {
        "inspect": ["inspect", broken],
        "compat": ["compat", src, broken],
        "transplant": ["transplant", "-t", broken, "-s", src, "-o", tmp_path / "out", "--module", "*"],
        "verify": ["verify", src, "-t", broken, "-s", src],
    }[command]
    refused(args, message, watch=tmp_path)


@pytest.mark.parametrize("command", ["inspect", "compat", "transplant", "verify"])
def test_missing_path(tmp_path: Path, intact_pair: tuple[Path, Path], command: str) -> None:
    missing = tmp_path / "missing"
    args = {
        "inspect": ["inspect", missing],
        "compat": ["compat", intact_pair[0], missing],
        "transplant": ["transplant", "-t", missing, "-s", intact_pair[0], "-o", tmp_path / "out", "--module", "*"],
        "verify": ["verify", missing, "-t", intact_pair[1], "-s", intact_pair[0]],
    }[command]
    refused(args, "no such checkpoint folder", watch=tmp_path)


def transplant_args(tmp_path: Path, src: Path, tgt: Path, *extra) -> list:
    return ["transplant", "-t", tgt, "-s", src, "-o", tmp_path / "out", *extra]


@pytest.fixture
def copied_pair(tmp_path: Path, intact_pair: tuple[Path, Path]) -> tuple[Path, Path, Path]:
    """A private copy of the pair plus a matching manifest, all under tmp_path."""
    src = shutil.copytree(intact_pair[0], tmp_path / "source")
    tgt = shutil.copytree(intact_pair[1], tmp_path / "target")
    return src, tgt, write_manifest(tmp_path / "m.json", src, tgt)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-m", "{m}", "-k", "0"], "--top-k must be a positive integer, got 0"),
        (["-m", "{m}", "-k", "-1"], "--top-k must be a positive integer, got -1"),
        (["-m", "{m}", "-k", "15"], "--top-k 15 is more than the 14 modules available"),
        (["-m", "{m}", "-k", "7", "--only", "mlp"], "--top-k 7 is more than the 6 modules"),
        (["-m", "{m}"], "a manifest needs --top-k K"),
        (["-k", "3"], "--top-k ranks modules and needs --manifest"),
        ([], "nothing selected"),
        (["--module", "*.nothing_here"], "--module pattern '*.nothing_here' matches no transplantable module"),
        (["--module", "model.norm"], "names model.norm, which is not transplantable: normalization layer"),
        (["--module", "*", "--layers", "x"], "layer range 'x' is not of the form"),
        (["-m", "{tmp}/missing.json", "-k", "2"], "no such manifest"),
    ],
)
def test_bad_selection(tmp_path: Path, copied_pair, extra: list[str], message: str) -> None:
    src, tgt, manifest = copied_pair
    extra = [e.format(m=manifest, tmp=tmp_path) for e in extra]
    refused(transplant_args(tmp_path, src, tgt, *extra), message, watch=tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.update(schema_version=7), "schema_version 7 is not supported"),
        (lambda o: o["modules"][0].pop("score"), "invalid manifest at modules/0: 'score' is a required property"),
        (
            lambda o: o["modules"][0].update(name="model.embed_tokens"),
            "manifest module 'model.embed_tokens' is not transplantable (embedding is not transplanted)",
        ),
        (
            lambda o: o["modules"][0].update(shape=[8, 8]),
            "manifest module 'model.layers.0.self_attn.q_proj' lists tensors",
        ),
    ],
)
def test_bad_manifest(tmp_path: Path, copied_pair, change, message: str) -> None:
    src, tgt, manifest = copied_pair
    obj = json.loads(manifest.read_text())
    change(obj)
    manifest.write_text(json.dumps(obj))
    refused(transplant_args(tmp_path, src, tgt, "-m", manifest, "-k", 2), message, watch=tmp_path)


def test_manifest_for_other_checkpoints_needs_force(tmp_path: Path, copied_pair) -> None:
    src, tgt, manifest = copied_pair
    obj = json.loads(manifest.read_text())
    obj["target"]["fingerprint"] = "sha256:" + "1" * 64
    manifest.write_text(json.dumps(obj))
    refused(
        transplant_args(tmp_path, src, tgt, "-m", manifest, "-k", 2),
        "manifest was made for target",
        watch=tmp_path,
    )
    forced = CliRunner().invoke(
        main, [str(a) for a in transplant_args(tmp_path, src, tgt, "-m", manifest, "-k", 2)] + ["--force", "-q"]
    )
    assert forced.exit_code == 0, forced.output
    assert "warning: manifest was made for target" in forced.stderr and "continuing because of --force" in forced.stderr
    assert (tmp_path / "out" / "transplant.json").is_file()


def test_shape_mismatch_in_requested_module(tmp_path: Path, intact_pair: tuple[Path, Path]) -> None:
    src = make_model(tmp_path / "wide", 1, intermediate_size=48)
    tgt = shutil.copytree(intact_pair[1], tmp_path / "target")
    refused(
        transplant_args(tmp_path, src, tgt, "--module", "model.layers.0.mlp.up_proj"),
        "not transplantable: shape differs for model.layers.0.mlp.up_proj.weight: source [48, 32], target [64, 32]",
        watch=tmp_path,
    )


def test_architectures_differ(tmp_path: Path, intact_pair: tuple[Path, Path]) -> None:
    src = make_model(tmp_path / "qwen", 1, arch="qwen2")
    tgt = shutil.copytree(intact_pair[1], tmp_path / "target")
    refused(["compat", src, tgt], "architectures differ", watch=tmp_path)
    refused(transplant_args(tmp_path, src, tgt, "--module", "*"), "architectures differ", watch=tmp_path)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("target", "is inside the target checkpoint"),
        ("source", "is inside the source checkpoint"),
        ("target/sub", "is inside the target checkpoint"),
        (".", "contains the target checkpoint"),
        ("exists", "already exists; choose a new path or pass --overwrite"),
        ("file", "exists and is not a folder"),
    ],
)
def test_bad_output_path(tmp_path: Path, copied_pair, out: str, message: str) -> None:
    src, tgt, _ = copied_pair
    (tmp_path / "exists").mkdir()
    (tmp_path / "file").write_text("x")
    extra = ["--overwrite"] if out == "file" else []
    refused(
        ["transplant", "-t", tgt, "-s", src, "-o", tmp_path / out, "--module", "*", *extra],
        message,
        watch=tmp_path,
    )


def test_interrupted_write_leaves_nothing(tmp_path: Path, copied_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    src, tgt, _ = copied_pair
    before = tree_digest(tmp_path)
    calls = []
    # `surgery.transplants.write` is the re-exported function; patch the module it lives in.
    module = importlib.import_module("surgery.transplants.write")
    real_copy = OutputFile.copy

    def interrupt(*args) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the data
        real_copy(*args)

    monkeypatch.setattr(OutputFile, "copy", interrupt)
    with pytest.raises(KeyboardInterrupt):
        module.transplant(target=tgt, source=src, out=tmp_path / "out", modules=["*"], progress=False)
    assert len(calls) == 3
    assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "source", "target"]


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("surgery.checkpoints.direct_write", "write_all"),  # headers and blocks, on direct_write's worker thread
        ("os", "copy_file_range"),  # copies through the page cache: ENOSPC is not "unsupported here"
        ("os", "fsync"),  # with delayed allocation a full disk may show only when flushing
    ],
)
def test_disk_full_during_write_is_one_clean_error(
    tmp_path: Path, copied_pair, monkeypatch: pytest.MonkeyPatch, module: str, name: str
) -> None:
    src, tgt, _ = copied_pair

    def enospc(*args) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(importlib.import_module(module), name, enospc)
    refused(transplant_args(tmp_path, src, tgt, "--module", "*"), "No space left on device", watch=tmp_path)


def test_not_enough_free_space_is_refused_up_front(
    tmp_path: Path, copied_pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, tgt, _ = copied_pair
    module = importlib.import_module("surgery.transplants.write")
    monkeypatch.setattr(module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 0))
    refused(transplant_args(tmp_path, src, tgt, "--module", "*"), "GiB free; free some space", watch=tmp_path)
