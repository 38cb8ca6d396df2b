"""Streaming transplant and verify on tiny real models, end to end through the CLI."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from surgery import SurgeryError, open_checkpoint, transplant, verify
from surgery.cli import main
from surgery.transplants.verify import VerificationError
from tests.helpers import cli, flip_bit, make_model, tensors, tree_digest, write_manifest

CASES = {
    "single-fp32": {"dtype": torch.float32},
    "sharded-fp32": {"dtype": torch.float32, "shard": "20KB"},
    "single-bf16-tied": {"dtype": torch.bfloat16, "tied": True},
    "sharded-bf16": {"dtype": torch.bfloat16, "shard": "10KB"},
    "sharded-fp32-tied": {"dtype": torch.float32, "tied": True, "shard": "20KB"},
    "qwen2-bias": {"arch": "qwen2", "shard": "20KB"},
}


def logits(model_dir: Path | None = None, model: torch.nn.Module | None = None) -> torch.Tensor:
    model = model or AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 5, 9, 33, 77, 100, 3]])
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("case", CASES)
def test_transplant_end_to_end(tmp_path: Path, case: str) -> None:
    src = make_model(tmp_path / "source", 1, **CASES[case])
    tgt = make_model(tmp_path / "target", 2, **CASES[case])
    before = {p: tree_digest(p) for p in (src, tgt)}
    manifest = write_manifest(tmp_path / "m.json", src, tgt, reverse=True)
    out = tmp_path / "out"

    result = cli("transplant", "-t", tgt, "-s", src, "-o", out, "-m", manifest, "-k", 5, "-q")
    assert result.exit_code == 0, result.output
    assert before == {p: tree_digest(p) for p in (src, tgt)}, "inputs were modified"

    record = json.loads((out / "transplant.json").read_text())
    # Reverse order puts layer 1's MLP first, then its attention output.
    assert record["modules"] == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    moved = {t["name"] for t in record["tensors"]}
    expected_moved = {f"{m}.weight" for m in record["modules"]}
    if case == "qwen2-bias":
        expected_moved.add("model.layers.1.self_attn.v_proj.bias")
    assert moved == expected_moved

    # Same layout as the target; every tensor from the right origin.
    # Plus the model card, generated (surgery.transplants.card), never the target's README.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in tgt.iterdir() if p.name != "README.md"] + ["transplant.json", "README.md"]
    )
    got, want_src, want_tgt = tensors(out), tensors(src), tensors(tgt)
    assert got.keys() == want_tgt.keys()
    for name, t in got.items():
        want = want_src[name] if name in moved else want_tgt[name]
        assert t.dtype == want_tgt[name].dtype and torch.equal(t, want), name
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            assert f.metadata()["format"] == "pt" and "surgery.provenance" in f.metadata()

    # Loads as is, with no missing or unexpected keys, and equals a model patched in memory.
    patched, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = AutoModelForCausalLM.from_pretrained(tgt)
    state = reference.state_dict()
    with torch.no_grad():
        for name in moved:
            state[name].copy_(want_src[name])
    assert torch.equal(logits(model=patched), logits(model=reference))
    assert not torch.equal(logits(model=patched), logits(tgt))

    ok = cli("verify", out, "-t", tgt, "-s", src)
    assert ok.exit_code == 0 and ok.stdout.startswith(f"ok: {len(got)} tensors, ")
    assert f"({len(moved)} from the source), and" in ok.stdout

    # Flip one byte inside a transplanted tensor: verify must name it.
    name = "model.layers.1.mlp.up_proj.weight"
    flip_bit(out, name)
    bad = cli("verify", out, "-t", tgt, "-s", src)
    assert bad.exit_code == 1
    assert bad.stderr.startswith(f"verify failed: tensor {name!r}: byte 3 differs from the source checkpoint")


@pytest.fixture
def patched(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> tuple[Path, Path, Path]:
    """A fresh transplant output of layer 0's MLP: (out, target, source)."""
    src, tgt = sharded_pair
    transplant(target=tgt, source=src, out=tmp_path / "out", modules=["*.0.mlp.*"], progress=False)
    return tmp_path / "out", tgt, src


def test_flipped_byte_in_untouched_tensor_is_caught(patched: tuple[Path, Path, Path]) -> None:
    ref = open_checkpoint(patched[0]).tensors["model.embed_tokens.weight"]
    data = bytearray(ref.shard.path.read_bytes())
    data[ref.offset + ref.info.nbytes - 1] ^= 0x80
    ref.shard.path.write_bytes(data)
    with pytest.raises(VerificationError, match=r"'model.embed_tokens.weight': byte 16383 differs from the target"):
        verify(patched[0], target=patched[1], source=patched[2])


def test_changed_copied_file_is_caught(patched: tuple[Path, Path, Path]) -> None:
    (patched[0] / "tokenizer_config.json").write_text("{}")
    with pytest.raises(VerificationError, match=r"file tokenizer_config.json"):
        verify(patched[0], target=patched[1], source=patched[2])


def test_verify_against_wrong_checkpoint(tmp_path: Path, patched: tuple[Path, Path, Path]) -> None:
    out, tgt, src = patched
    other = make_model(tmp_path / "other", 5, intermediate_size=48)
    with pytest.raises(VerificationError, match="was not made from source"):
        verify(out, target=tgt, source=other)
    with pytest.raises(SurgeryError, match="no such transplant record; pass a folder written by `surgery transplant`"):
        verify(tgt, target=tgt, source=src)


def test_bf16_source_into_fp32_target_is_cast(tmp_path: Path) -> None:
    src = make_model(tmp_path / "source", 1, dtype=torch.bfloat16)
    tgt = make_model(tmp_path / "target", 2, dtype=torch.float32, shard="20KB")
    out = tmp_path / "out"
    result = transplant(target=tgt, source=src, out=out, modules=["model.layers.0.*"], progress=False)
    assert len(result.modules) == 7
    got, want_src = tensors(out), tensors(src)
    for name in result.tensors:
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], want_src[name].to(torch.float32)), name
    assert verify(out, target=tgt, source=src).from_source == 7


def test_python_api_and_overwrite(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    src, tgt = sharded_pair
    out = tmp_path / "out"
    first = transplant(target=tgt, source=src, out=out, modules=["*.q_proj"], progress=False)
    assert first.modules == ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
    with pytest.raises(SurgeryError, match="already exists; choose a new path or pass --overwrite"):
        transplant(target=tgt, source=src, out=out, modules=["*.k_proj"], progress=False)
    second = transplant(target=tgt, source=src, out=out, modules=["*.k_proj"], overwrite=True, progress=False)
    assert json.loads((out / "transplant.json").read_text())["modules"] == list(second.modules)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temp folders left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_link_shares_inodes_only_for_untouched_shards(tmp_path: Path) -> None:
    """--link: shards without a selected tensor are the target's own files; verify accepts the output."""
    tgt = make_model(tmp_path / "t", 1, shard="20KB")
    src = make_model(tmp_path / "s", 2, shard="20KB")
    before = tree_digest(tgt)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "transplant",
            "-t",
            str(tgt),
            "-s",
            str(src),
            "-o",
            str(out),
            "--module",
            "model.layers.1.mlp.*",
            "--link",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "transplant.json").read_text())
    touched = {open_checkpoint(tgt).tensors[t].shard.path.name for t in (x["name"] for x in record["tensors"])}
    shards = sorted(p.name for p in tgt.glob("*.safetensors"))
    assert touched and set(record["linked_shards"]) == set(shards) - touched
    for name in shards:
        same = (out / name).stat().st_ino == (tgt / name).stat().st_ino
        assert same == (name not in touched), name
    verify(out, target=tgt, source=src)
    assert tree_digest(tgt) == before, "the target must not change"
    # The bytes equal a plain transplant's, shard for shard, except the provenance in rewritten headers.
    plain = tmp_path / "plain"
    transplant(target=tgt, source=src, out=plain, modules=["model.layers.1.mlp.*"], progress=False)
    a, b = open_checkpoint(out), open_checkpoint(plain)
    for t, ref in a.tensors.items():
        assert _tensor_bytes(ref) == _tensor_bytes(b.tensors[t]), t


def test_dry_run_prints_the_write_plan_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_model(tmp_path / "source", 1, shard="20KB")
    tgt = make_model(tmp_path / "target", 2, shard="20KB")
    monkeypatch.delenv("SURGERY_DIRECT_IO", raising=False)
    before = tree_digest(tmp_path)
    refs = {n: ref for n, ref in open_checkpoint(tgt).tensors.items() if n.startswith("model.layers.1.mlp.")}
    taken, nbytes = sorted(refs), sum(ref.nbytes for ref in refs.values())
    args = ["transplant", "-t", tgt, "-s", src, "-o", tmp_path / "out", "--module", "model.layers.1.mlp.*"]

    planned = cli(*args, "--link", "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert "page cache (" in planned.stdout  # a small checkpoint stays cached for the next command: the mode and why
    assert "fits in half the memory available" in planned.stdout
    assert "hard link to" in planned.stdout  # the shards no selected tensor touches
    assert f"{len(taken)} tensors ({nbytes} bytes, 0 cast) from the source" in planned.stdout
    assert all(name in planned.stdout for name in taken)
    assert "nothing written (--dry-run)" in planned.stdout

    patch = cli(*args, "--patch", "--reversible", "--dry-run")
    assert patch.exit_code == 0, patch.output
    assert "patch.safetensors (patch)" in patch.stdout and "original.safetensors (original)" in patch.stdout
    assert "O_DIRECT (a patch is written once" in patch.stdout
    assert all(name in patch.stdout for name in taken)

    monkeypatch.setenv("SURGERY_DIRECT_IO", "1")
    forced = cli(*args, "--dry-run")
    assert forced.exit_code == 0, forced.output
    assert "O_DIRECT (SURGERY_DIRECT_IO=1)" in forced.stdout
    assert tree_digest(tmp_path) == before  # nothing written: no output, temp folder or lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "target"]


def test_the_python_api_refuses_the_flag_combinations_the_cli_does(
    tmp_path: Path, sharded_pair: tuple[Path, Path]
) -> None:
    from surgery.transplants.command import transplant_output

    src, tgt = sharded_pair
    common = {"target": tgt, "source": src, "out": tmp_path / "out", "modules": ["*.q_proj"], "progress": False}
    with pytest.raises(SurgeryError, match=r"^--reversible only applies with --patch$"):
        transplant_output(**common, reversible=True)
    with pytest.raises(SurgeryError, match=r"^--link and --eval-results apply to full checkpoints, not to --patch$"):
        transplant_output(**common, patch=True, link=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    planned = transplant_output(**common, dry_run=True)
    assert not (tmp_path / "out").exists()
    assert {p.tensor for f in planned.files for p in f.hashed} == {
        n for n in open_checkpoint(tgt).tensors if n.endswith("q_proj.weight")
    }


def _tensor_bytes(ref) -> bytes:
    with open(ref.shard.path, "rb") as f:
        f.seek(ref.offset)
        return f.read(ref.info.nbytes)


def test_link_across_filesystems_copies_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    tgt, src = make_model(tmp_path / "t", 1, shard="20KB"), make_model(tmp_path / "s", 2, shard="20KB")

    def cross_device(a, b) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", cross_device)
    out = tmp_path / "out"
    transplant(target=tgt, source=src, out=out, modules=["model.layers.1.mlp.*"], link=True, progress=False)
    assert "copying them" in capfd.readouterr().err
    assert json.loads((out / "transplant.json").read_text())["linked_shards"] == []
    assert all(p.stat().st_nlink == 1 for p in out.glob("*.safetensors"))
    verify(out, target=tgt, source=src)


def test_verify_finds_an_edit_of_the_target_in_place_through_a_linked_shard(tmp_path: Path) -> None:
    tgt, src = make_model(tmp_path / "t", 1, shard="20KB"), make_model(tmp_path / "s", 2, shard="20KB")
    out = tmp_path / "out"
    made = cli("transplant", "-t", tgt, "-s", src, "-o", out, "--module", "model.layers.1.mlp.*", "--link", "-q")
    assert made.exit_code == 0, made.output
    linked = json.loads((out / "transplant.json").read_text())["linked_shards"]
    shards = len(list(tgt.glob("*.safetensors")))
    assert 0 < len(linked) < shards
    assert f"; {len(linked)} of {shards} shards hard-linked to the target" in made.stdout
    assert made.stderr.count("editing the target in place changes this output too") == 1
    ok = cli("verify", out)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.rstrip().endswith(f"; {len(linked)} of {shards} shards are hard links to the target")
    # A record without the linked shards' sha256 (an older surgery's) cannot have every byte checked.
    record = json.loads((out / "transplant.json").read_text())
    (out / "transplant.json").write_text(json.dumps({k: v for k, v in record.items() if k != "linked_sha256"}))
    older = cli("verify", out)
    assert older.exit_code == 1 and "records no sha256 of its tensors" in older.stderr, older.output
    (out / "transplant.json").write_text(json.dumps(record))
    # One byte of the target flipped in place, where the fingerprint does not sample: the linked output
    # changed with it, and verify says so.
    ckpt = open_checkpoint(tgt)
    ref = next(ref for ref in ckpt.tensors.values() if ref.shard.path.name == linked[0])
    assert ref.info.nbytes > 1000
    flip_bit(tgt, ref.info.name, at=100)
    bad = cli("verify", out)
    assert bad.exit_code == 1, bad.output
    assert f"tensor {ref.info.name!r}: sha256 differs from the one in transplant.json; {linked[0]} is a hard link" in (
        bad.stderr
    )
