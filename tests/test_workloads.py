"""Workloads: built-ins come from train splits and never overlap the test problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgery import SurgeryError
from surgery.analysis.workloads import load_workload
from surgery.data import read_jsonl_gz


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


@pytest.mark.parametrize(
    ("train", "field", "test", "test_field"),
    [
        ("gsm8k-train.jsonl.gz", "question", "gsm8k-test.jsonl.gz", "question"),
        ("math-train.jsonl.gz", "problem", "math500-test.jsonl.gz", "problem"),
    ],
)
def test_train_splits_do_not_overlap_test_problems(train: str, field: str, test: str, test_field: str) -> None:
    train_rows, test_rows = read_jsonl_gz(train), read_jsonl_gz(test)
    assert len(train_rows) in (7473, 7500) and len(test_rows) in (1319, 500)
    overlap = {_norm(r[field]) for r in train_rows} & {_norm(r[test_field]) for r in test_rows}
    assert not overlap, f"{len(overlap)} train problems appear in {test}"


def test_builtin_is_a_seeded_sample_of_the_train_split() -> None:
    a, b = load_workload("gsm8k-train:16"), load_workload("gsm8k-train:16:0")
    assert a == b and a.name == "gsm8k-train:16:0" and len(a.prompts) == 16
    other = load_workload("gsm8k-train:16:1")
    assert other.prompts != a.prompts and other.sha256 != a.sha256
    train = {r["question"] for r in read_jsonl_gz("gsm8k-train.jsonl.gz")}
    assert set(a.prompts) <= train
    assert len(load_workload("math-train:3").prompts) == 3


def test_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"question": "b"}\n{"problem": "c", "x": 1}\n')
    w = load_workload(str(path))
    assert w.prompts == ("a", "b", "c") and w.name == "w.jsonl"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ('{"prompt": "a"}\n{oops\n', "line 2: not valid JSON"),
        ('{"text": "a"}\n', "line 1: no non-empty 'prompt' or 'question'"),
        ('["a"]\n', "line 1: no non-empty"),
        ('{"prompt": ""}\n', "line 1: no non-empty"),
    ],
)
def test_bad_workload_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text(content)
    with pytest.raises(SurgeryError, match=message):
        load_workload(str(path))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gsm8k-test:5", "unknown workload 'gsm8k-test:5'"),
        ("nope", "unknown workload"),
        ("gsm8k-train:0", "count must be between 1 and 7473"),
        ("gsm8k-train:99999", "count must be between 1 and 7473"),
        ("missing/w.jsonl", "does not exist"),
    ],
)
def test_bad_workload_specs(spec: str, message: str) -> None:
    with pytest.raises(SurgeryError, match=message):
        load_workload(spec)


def test_prompt_set_hash_is_order_sensitive(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ["x", "y"]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ["y", "x"]))
    assert load_workload(str(tmp_path / "a.jsonl")).sha256 != load_workload(str(tmp_path / "b.jsonl")).sha256
