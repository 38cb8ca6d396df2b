"""Hostile checkpoints: pickles that run code, symlinks out of the folder, custom model code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from surgery import open_checkpoint
from surgery.cli import main
from tests.helpers import make_model, refused, tree_digest
from tests.hub_cache import add_snapshot, commit_hash


class Payload:
    """Unpickling this runs `exec`, which writes a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.fixture(scope="module")
def pickled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint whose pytorch_model.bin runs code when unpickled, and a benign tied one beside it.

    Tests only read here; what they write goes to their own tmp_path.
    """
    tmp_path = tmp_path_factory.mktemp("pickled")
    base = make_model(tmp_path / "base", 1, tied=True)
    evil, benign = tmp_path / "evil", tmp_path / "benign"
    for folder in (evil, benign):
        folder.mkdir()
        for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            shutil.copy(base / name, folder / name)
    marker = tmp_path / "MARKER"
    state = {name: t for shard in base.glob("*.safetensors") for name, t in load_file(shard).items()}
    torch.save({**state, "extra": Payload(marker)}, evil / "pytorch_model.bin")
    # A tied head: lm_head.weight shares the embedding's storage, as in a real model's state_dict.
    torch.save({**state, "lm_head.weight": state["model.embed_tokens.weight"]}, benign / "pytorch_model.bin")
    return {"base": base, "evil": evil, "benign": benign, "marker": marker, "root": tmp_path}


@pytest.mark.parametrize("command", ["inspect", "compat", "transplant", "verify", "profile", "eval"])
def test_pickle_is_never_read_by_the_other_commands(pickled: dict[str, Path], command: str) -> None:
    evil, base, root = pickled["evil"], pickled["base"], pickled["root"]
    args = {
        "inspect": ["inspect", evil],
        "compat": ["compat", evil, base],
        "transplant": ["transplant", "-t", evil, "-s", base, "-o", root / "out", "--module", "*"],
        "verify": ["verify", base, "-t", evil, "-s", base],
        "profile": ["profile", evil, "-w", "gsm8k-train:2", "-o", root / "s.safetensors"],
        "eval": ["eval", evil, "-b", "gsm8k", "--limit", "2", "-o", root / "res"],
    }[command]
    refused(args, f"surgery import-pickle {evil} -o {evil}-safetensors --allow-pickle", watch=root)
    assert not pickled["marker"].exists()


def test_import_pickle_reads_nothing_without_allow_pickle(pickled: dict[str, Path]) -> None:
    evil = pickled["evil"]
    refused(
        ["import-pickle", evil, "-o", pickled["root"] / "out"],
        f"{evil / 'pytorch_model.bin'}: reading pickle weights means unpickling them, which can run code; "
        "pass --allow-pickle if you trust the files",
        watch=pickled["root"],
    )
    assert not pickled["marker"].exists()


def test_weights_only_refuses_a_pickle_that_runs_code(pickled: dict[str, Path]) -> None:
    evil = pickled["evil"]
    refused(
        ["import-pickle", evil, "-o", pickled["root"] / "out", "--allow-pickle"],
        f"{evil / 'pytorch_model.bin'}: refused by torch.load(weights_only=True) (Unsupported global: GLOBAL "
        "exec was not an allowed global by default); it is not a plain tensor checkpoint",
        watch=pickled["root"],
    )
    assert not pickled["marker"].exists()


def test_allow_pickle_converts_a_benign_state_dict(tmp_path: Path, pickled: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["import-pickle", str(pickled["benign"]), "-o", str(out), "--allow-pickle"])
    assert result.exit_code == 0, result.output
    got, want = load_file(out / "model.safetensors"), load_file(pickled["base"] / "model.safetensors")
    # The tied head is stored on its own (safetensors cannot share storage); every other tensor as it was.
    assert sorted(got) == sorted([*want, "lm_head.weight"])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(got["lm_head.weight"], want["model.embed_tokens.weight"])
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]


def test_sharded_pickle_keeps_its_index(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base", 1, shard="20KB")
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(base / "config.json", src / "config.json")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(base.glob("*.safetensors")):
        name = shard.name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        tensors = load_file(shard)
        torch.save(tensors, src / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    from surgery.importers.from_pickle import import_pickle

    out = import_pickle(src, tmp_path / "out", allow_pickle=True)
    converted = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert converted == index["weight_map"], "shards keep their tensors and names (pytorch_model-* -> model-*)"
    assert open_checkpoint(out).fingerprint == open_checkpoint(base).fingerprint


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside every checkpoint that a hostile one would like to read."""
    path = tmp_path / "secret" / "key.txt"
    path.parent.mkdir()
    path.write_text("hunter2")
    return path


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(lambda ckpt, secret: ("tokenizer.json", secret), id="file"),
        pytest.param(lambda ckpt, secret: ("extra", secret.parent), id="folder"),
        pytest.param(lambda ckpt, secret: ("config.json", secret), id="config"),
        pytest.param(lambda ckpt, secret: (next(ckpt.glob("model-*")).name, secret), id="shard"),
        pytest.param(lambda ckpt, secret: ("sub", ckpt / ".." / "secret"), id="relative"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "transplant"])
def test_symlink_out_of_the_checkpoint_is_refused(
    tmp_path: Path, sharded_pair: tuple[Path, Path], secret: Path, plant, command: str
) -> None:
    tgt = shutil.copytree(sharded_pair[1], tmp_path / "target")
    name, dest = plant(tgt, secret)
    (tgt / name).unlink(missing_ok=True)
    (tgt / name).symlink_to(dest)
    args = {
        "inspect": ["inspect", tgt],
        "transplant": ["transplant", "-t", tgt, "-s", sharded_pair[0], "-o", tmp_path / "out", "--module", "*"],
    }[command]
    refused(args, f"{tgt / name}: a symlink to {dest.resolve()}, outside the checkpoint folder", watch=tmp_path)


def test_symlinks_inside_the_checkpoint_are_fine(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    tgt = shutil.copytree(sharded_pair[1], tmp_path / "target")
    (tgt / "tokenizer.json").symlink_to("tokenizer_config.json")
    (tgt / "docs").mkdir()
    (tgt / "docs" / "card.md").symlink_to(Path("..") / "config.json")
    assert open_checkpoint(tgt).tensors


def test_cache_snapshot_links_must_stay_in_their_own_repo(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    cache = tmp_path / "hub"
    snapshot = add_snapshot(cache, "org/target", sharded_pair[1], commit_hash("main"))
    other = add_snapshot(cache, "org/other", sharded_pair[0], commit_hash("other"))
    assert open_checkpoint(snapshot).hub.repo_id == "org/target"  # links into its own blobs/ are allowed
    stolen = (other / "config.json").resolve()
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(os.path.relpath(stolen, snapshot))
    refused(["inspect", snapshot], f"a symlink to {stolen}, outside the checkpoint folder", watch=tmp_path)


def test_custom_model_code_never_runs_without_trust(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "custom", 1)
    marker = tmp_path / "MARKER"
    (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    before = tree_digest(folder)
    for args in (["compat", folder, folder], ["profile", folder, "-w", "gsm8k-train:2", "-o", tmp_path / "s"]):
        refused(args, "config.json has auto_map (custom model code), which surgery does not run", watch=tmp_path)
    assert not marker.exists() and tree_digest(folder) == before
