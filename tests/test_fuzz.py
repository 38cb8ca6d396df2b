"""The header and index parsers under malformed input: a short derandomized run of fuzz/fuzz_headers.py's
properties, the seed corpus replayed, and huge claims refused before anything is allocated."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz.fuzz_headers import (
    build_folder,
    check_folder,
    check_header_bytes,
    folder_specs,
    header_files,
    make_bait,
    peak_allocation,
    safetensors_bytes,
)
from surgery.checkpoints.files import INDEX_FILE
from surgery.checkpoints.header import read_header
from surgery.errors import SurgeryError

CORPUS = Path(__file__).parent / "fuzz_corpus"
EXPECTED: dict[str, dict[str, str]] = json.loads((CORPUS / "expected.json").read_text())
# Fixed and derandomized: the same examples on every run, so a failure here is a real regression.
SHORT = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SHORT
@given(data=header_files())
def test_header_parser_raises_only_surgery_errors_within_bounded_memory(tmp_path: Path, data: bytes) -> None:
    check_header_bytes(data, tmp_path)


@settings(SHORT, max_examples=100)
@given(spec=folder_specs())
def test_opener_never_opens_a_file_outside_the_checkpoint(tmp_path: Path, spec: dict) -> None:
    check_folder(build_folder(spec, tmp_path))


def test_corpus_lists_every_file() -> None:
    assert sorted(EXPECTED) == sorted(p.name for p in CORPUS.iterdir() if p.name != "expected.json")


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.endswith(".safetensors")))
def test_corpus_header(tmp_path: Path, name: str) -> None:
    refusal = check_header_bytes((CORPUS / name).read_bytes(), tmp_path)
    assert refusal is not None and EXPECTED[name]["refused"] in refusal, refusal


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.endswith(".index.json")))
def test_corpus_index(tmp_path: Path, name: str) -> None:
    folder = build_folder({"index": None, "shards": {}, "config": "valid", "link": None, "link_name": ""}, tmp_path)
    (folder / INDEX_FILE).write_bytes((CORPUS / name).read_bytes())
    refusal = check_folder(folder)
    assert refusal is not None and EXPECTED[name]["refused"] in refusal, refusal


def test_valid_folder_is_accepted(tmp_path: Path) -> None:
    # The counterpart of the corpus: the same scaffolding with a sound index opens, so refusals mean something.
    folder = build_folder({"index": None, "shards": {}, "config": "valid", "link": None, "link_name": ""}, tmp_path)
    (folder / "model-00001-of-00001.safetensors").write_bytes(safetensors_bytes(["a"]))
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    assert check_folder(folder) is None


def test_ten_terabyte_tensor_is_refused_from_the_header_alone(tmp_path: Path) -> None:
    raw = json.dumps({"w": {"dtype": "F32", "shape": [2_500_000_000_000], "data_offsets": [0, 10**13]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with peak_allocation() as peak, pytest.raises(SurgeryError, match="tensors end at data offset 10000000000000"):
        read_header(path)
    assert peak[0] < 64 * 1024


def test_one_gigabyte_header_is_refused_from_its_length_alone(tmp_path: Path) -> None:
    # A sparse file that really is 1 GiB long, so only the length limit can stop the read.
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 2**30))
        f.truncate(8 + 2**30)
    assert path.stat().st_size == 8 + 2**30
    with peak_allocation() as peak, pytest.raises(SurgeryError, match="header claims 1073741824 bytes, over the"):
        read_header(path)
    assert peak[0] < 64 * 1024, "the header was read before its length was checked"


def test_link_to_a_valid_shard_outside_is_refused_not_read(tmp_path: Path) -> None:
    # The bait outside is a perfectly valid shard: only the link rule stands between it and the parser.
    outside = make_bait(tmp_path)
    folder = build_folder({"index": None, "shards": {}, "config": "valid", "link": None, "link_name": ""}, tmp_path)
    os.symlink(outside / "secret.safetensors", folder / "model.safetensors")
    refusal = check_folder(folder)
    assert refusal is not None and "outside the checkpoint folder" in refusal
