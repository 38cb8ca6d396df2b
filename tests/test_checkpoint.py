"""Checkpoint reading: strict header validation, index checks, fingerprints, `inspect`."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery import SurgeryError, open_checkpoint
from surgery.checkpoints.folder import TensorRef
from surgery.checkpoints.header import MAX_HEADER_BYTES, read_header
from surgery.checkpoints.streaming import read_tensor
from surgery.checkpoints.swap import TensorReader
from surgery.cli import main
from tests.helpers import cli, make_model

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}


def raw_file(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    """Write a safetensors file by hand, with a header that may be malformed."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def folder_with(tmp_path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    raw_file(tmp_path / "model.safetensors", header, data, length)
    return tmp_path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_valid_file_matches_safetensors_library(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.bfloat16), "c": torch.zeros(0)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "x.safetensors")
    got = {t.name: (t.dtype, t.shape, t.nbytes) for t in header.tensors}
    assert got == {"a": ("F32", (3, 4), 48), "b": ("BF16", (5,), 10), "c": ("F32", (0,), 0)}
    assert header.metadata == {"format": "pt"}


def test_read_tensor_matches_safetensors_library(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5, dtype=torch.float64).bfloat16(), "c": torch.zeros(2, 0)}
    save_file(tensors, tmp_path / "x.safetensors")
    header = read_header(tmp_path / "x.safetensors")
    fd = os.open(tmp_path / "x.safetensors", os.O_RDONLY)
    try:
        for t in header.tensors:
            got = read_tensor(fd, TensorRef(header, t).offset, t.nbytes, t.dtype, t.shape)
            assert got.dtype == tensors[t.name].dtype and torch.equal(got, tensors[t.name]), t.name
    finally:
        os.close(fd)


def test_tensor_reader_reads_every_tensor_of_a_sharded_checkpoint(sharded_pair: tuple[Path, Path]) -> None:
    checkpoint = open_checkpoint(sharded_pair[0])
    expected = {k: v for shard in checkpoint.shards for k, v in load_file(shard.path).items()}
    assert len(checkpoint.shards) > 1
    with TensorReader(checkpoint) as reader:
        assert all(torch.equal(reader[name], tensor) for name, tensor in expected.items())
        assert set(expected) == set(checkpoint.tensors)


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (b"", b"", None, "not valid JSON"),
        (b"{not json", b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        ({"a": entry("F32", [2], 0, 8)}, b"\0" * 4, None, "truncated"),
        ({"a": entry("F32", [2], 0, 8)}, b"\0" * 8, 10**6, "runs past the end"),
        ({"a": entry("F32", [2], 0, 8)}, b"\0" * 8, MAX_HEADER_BYTES + 1, "byte limit"),
        ({"a": entry("Q4", [2], 0, 2)}, b"\0" * 2, None, "unknown dtype 'Q4'"),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}, b"\0" * 8, None, "overlaps"),
        ({"a": entry("F32", [2], 4, 12)}, b"\0" * 12, None, "gap"),
        ({"a": entry("F32", [2], 0, 8)}, b"\0" * 16, None, "data region is 16 bytes"),
        ({"a": entry("F32", [3], 0, 8)}, b"\0" * 8, None, "needs 12"),
        ({"a": entry("F32", [-1], 0, 8)}, b"\0" * 8, None, "invalid shape"),
        ({"a": entry("F32", [2], 8, 0)}, b"\0" * 8, None, "end before they begin"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "invalid data_offsets"),
        ({"__metadata__": {"k": 1}, "a": entry("F32", [2], 0, 8)}, b"\0" * 8, None, "__metadata__"),
    ],
)
def test_malformed_headers_are_refused(tmp_path: Path, header, data, length, message: str) -> None:
    folder = folder_with(tmp_path, header, data, length)
    with pytest.raises(SurgeryError, match=message):
        open_checkpoint(folder)
    # The CLI gives the same problem as one line and exit code 2, no traceback.
    result = cli("inspect", folder)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(SurgeryError, match="too short"):
        open_checkpoint(tmp_path)


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match="no such checkpoint folder"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(SurgeryError, match=r"no model.safetensors"):
        open_checkpoint(tmp_path)


def test_pickle_only_checkpoint_explains_conversion(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(SurgeryError, match=r"requires safetensors. Convert with") as e:
        open_checkpoint(tmp_path)
    assert f"surgery import-pickle {tmp_path} -o {tmp_path}-safetensors --allow-pickle" in str(e.value)


def test_truncated_shard(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    folder = shutil.copytree(sharded_pair[1], tmp_path / "t")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(SurgeryError, match="truncated"):
        open_checkpoint(folder)


def sharded_copy(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> tuple[Path, dict]:
    folder = shutil.copytree(sharded_pair[1], tmp_path / "t")
    return folder, json.loads((folder / "model.safetensors.index.json").read_text())


def test_index_naming_missing_shard(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    folder, _ = sharded_copy(tmp_path, sharded_pair)
    sorted(folder.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(SurgeryError, match="which is missing"):
        open_checkpoint(folder)


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "a\\b"])
def test_index_path_traversal(tmp_path: Path, sharded_pair: tuple[Path, Path], name: str) -> None:
    folder, index = sharded_copy(tmp_path, sharded_pair)
    (tmp_path / "evil.safetensors").write_bytes(b"")
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SurgeryError, match="not a plain file name"):
        open_checkpoint(folder)


def test_index_disagreeing_with_shards(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    folder, index = sharded_copy(tmp_path, sharded_pair)
    index["weight_map"]["model.ghost.weight"] = next(iter(index["weight_map"].values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SurgeryError, match=r"'model.ghost.weight' is listed"):
        open_checkpoint(folder)
    del index["weight_map"]["model.ghost.weight"]
    del index["weight_map"]["model.norm.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SurgeryError, match=r"'model.norm.weight' is in a shard but not in the index"):
        open_checkpoint(folder)


def test_fingerprint_tracks_config_layout_and_weights(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    source, target = (open_checkpoint(p) for p in sharded_pair)
    assert open_checkpoint(sharded_pair[1]).fingerprint == target.fingerprint
    # Same config and shapes, different weights (a fine-tune of the same base): different models.
    assert source.fingerprint != target.fingerprint
    wide = open_checkpoint(make_model(tmp_path / "wide", 1, intermediate_size=48))
    assert wide.fingerprint != source.fingerprint
    # One weight byte changed in the middle of one tensor changes it too.
    copy = shutil.copytree(sharded_pair[1], tmp_path / "copy")
    ref = open_checkpoint(copy).tensors["model.layers.1.mlp.up_proj.weight"]
    data = bytearray(ref.shard.path.read_bytes())
    data[ref.offset + ref.nbytes // 2] ^= 1
    ref.shard.path.write_bytes(data)
    assert open_checkpoint(copy).fingerprint != target.fingerprint


def test_inspect_reports_the_checkpoint(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    result = CliRunner().invoke(main, ["inspect", str(sharded_pair[1]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    ckpt = open_checkpoint(sharded_pair[1])
    assert info["model_type"] == "llama" and info["architectures"] == ["LlamaForCausalLM"]
    assert (info["layers"], info["hidden_size"], info["vocab_size"]) == (2, 32, 128)
    assert info["tied_embeddings"] is False
    assert info["shards"] == len(ckpt.shards) > 1
    assert info["tensors"] == 21 and info["dtypes"] == {"F32": 21}
    assert info["total_bytes"] == sum(p.stat().st_size for p in sharded_pair[1].glob("*.safetensors")) - sum(
        s.data_start for s in ckpt.shards
    )
    tied = make_model(tmp_path / "tied", 3, tied=True, dtype=torch.bfloat16)
    text = cli("inspect", tied)
    assert text.exit_code == 0
    assert "tied_embeddings  True" in text.stdout and "BF16: 20" in text.stdout and "shards           1" in text.stdout
