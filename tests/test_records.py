"""`transplant.json` and `patch.json` as typed records: they round-trip key for key, records of older
versions (fields missing) load, and a malformed one is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgery import SurgeryError, apply, open_patch, transplant, write_patch
from surgery.transplants.patch import PATCH_RECORD
from surgery.transplants.records import PatchRecord, TransplantRecord
from surgery.transplants.write import check_output

MODULES = ["model.layers.1.mlp.*", "model.layers.0.self_attn.q_proj"]


def written(record: TransplantRecord | PatchRecord) -> str:
    """The record's JSON text, as surgery writes it."""
    return json.dumps(record.to_dict(), indent=2) + "\n"


@pytest.fixture
def outputs(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> dict[str, Path]:
    """A transplant, a linked one, a reversible patch and its apply, on the shared pair."""
    src, tgt = sharded_pair
    made = {name: tmp_path / name for name in ("plain", "linked", "patch", "applied")}
    transplant(target=tgt, source=src, out=made["plain"], modules=MODULES, progress=False)
    transplant(target=tgt, source=src, out=made["linked"], modules=MODULES, link=True, progress=False)
    write_patch(target=tgt, source=src, out=made["patch"], modules=MODULES, reversible=True, progress=False)
    apply(patch=made["patch"], target=tgt, out=made["applied"], progress=False)
    return made


def test_records_round_trip_key_for_key(outputs: dict[str, Path]) -> None:
    for name in ("plain", "linked", "applied"):
        text = (outputs[name] / "transplant.json").read_text()
        record = TransplantRecord.from_dict(json.loads(text))
        assert written(record) == text, name
        assert TransplantRecord.from_dict(record.to_dict()) == record
    assert TransplantRecord.from_dict(json.loads((outputs["linked"] / "transplant.json").read_text())).linked_sha256
    assert TransplantRecord.from_dict(json.loads((outputs["applied"] / "transplant.json").read_text())).patch
    text = (outputs["patch"] / PATCH_RECORD).read_text()
    record = PatchRecord.from_dict(json.loads(text))
    assert written(record) == text
    assert PatchRecord.from_dict(record.to_dict()) == record == open_patch(outputs["patch"]).record
    assert record.original is not None and record.target_config is not None
    # What `push` reads of an output.
    assert check_output(outputs["plain"]).modules == record.modules


def test_records_of_older_versions_load(outputs: dict[str, Path]) -> None:
    """Fields added over time are optional: a record without them loads, and writes back as it was."""
    d = json.loads((outputs["linked"] / "transplant.json").read_text())
    for missing in ("linked_sha256", "linked_shards", "selection"):
        del d[missing]
        record = TransplantRecord.from_dict(d)
        assert getattr(record, missing) is None and record.to_dict() == d
    patch = json.loads((outputs["patch"] / PATCH_RECORD).read_text())
    del patch["target_config"]
    record = PatchRecord.from_dict(patch)
    assert record.target_config is None and record.to_dict() == patch


@pytest.mark.parametrize(
    ("kind", "breaks"),
    [
        ("transplant", lambda d: d["tensors"][0].pop("sha256")),
        ("transplant", lambda d: d.update(modules="model.layers.0.mlp.up_proj")),
        ("transplant", lambda d: d["source"].pop("fingerprint")),
        ("patch", lambda d: d["tensors"][0].pop("sha256")),
        ("patch", lambda d: d["tensors"][0].update(shape=["4"])),
        ("patch", lambda d: d.pop("card")),
        ("patch", lambda d: d.update(original=None)),  # reversible, without the target's headers
    ],
)
def test_a_malformed_record_is_refused_in_one_line(outputs: dict[str, Path], kind: str, breaks) -> None:
    folder, cls, file = (
        (outputs["plain"], TransplantRecord, "transplant.json")
        if kind == "transplant"
        else (outputs["patch"], PatchRecord, PATCH_RECORD)
    )
    d = json.loads((folder / file).read_text())
    breaks(d)
    with pytest.raises(SurgeryError, match="malformed record") as e:
        cls.from_dict(d, folder / file)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{folder / file}: ")
    # Read from the folder, the refusal is the same.
    (folder / file).write_text(json.dumps(d))
    with pytest.raises(SurgeryError, match="malformed record"):
        check_output(folder) if kind == "transplant" else open_patch(folder)


def test_a_patch_record_of_another_format_is_refused() -> None:
    with pytest.raises(SurgeryError, match="not a surgery-patch version 1 record"):
        PatchRecord.from_dict({"format": "surgery-patch", "version": 2})
