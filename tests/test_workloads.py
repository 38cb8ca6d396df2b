"""Workloads: built-ins come from train splits and never overlap the test problems."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from surgery import SurgeryError
from surgery.analysis.workloads import PromptSet, load_workload
from surgery.data import DOC_CHARS, DOCS_TRAINED, held_out_docstrings, read_jsonl_gz, stdlib_docstrings
from tests.helpers import save_tokenizer


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
        ('{"texts": "a"}\n', "line 1: no non-empty 'prompt', 'question' or 'text'"),
        ('{"text": ""}\n', "line 1: no non-empty 'prompt', 'question' or 'text'"),
        (
            '{"prompt": "a", "solution": "b", "prompt_format": "html"}\n',
            "prompt_format 'html' is not one of chat, plain",
        ),
        ('{"prompt": "a", "prompt_format": "chat"}\n{"prompt": "b"}\n', "mixes prompts rendered in different ways"),
        ('{"text": "a"}\n{"prompt": "b"}\n', "mixes prompts rendered in different ways"),
        ('["a"]\n', "line 1: not a JSON object"),
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


def test_text_lines_and_rendered_prompts(tmp_path: Path) -> None:
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "one"}\n{"text": "two"}\n')
    w = load_workload(str(text))
    assert w.prompts == ("", "") and w.solutions == ("one", "two") and w.prompt_format == "plain"
    other = tmp_path / "u.jsonl"
    other.write_text('{"text": "one"}\n{"text": "three"}\n')
    # Plain text has no prompts to tell sets apart: the solutions are part of its identity.
    assert load_workload(str(other)).sha256 != w.sha256
    rendered = tmp_path / "r.jsonl"
    rendered.write_text('{"prompt": "<|user|>q<|assistant|>", "solution": "s", "prompt_format": "chat"}\n')
    r = load_workload(str(rendered))
    assert r.prompt_format == "chat" and r.solutions == ("s",)
    # A set to render keeps the hash it always had (stats files and manifests made before still match).
    plain = tmp_path / "p.jsonl"
    plain.write_text('{"prompt": "x"}\n')
    assert load_workload(str(plain)).sha256 == hashlib.sha256(json.dumps(["x"]).encode()).hexdigest()


@pytest.mark.parametrize("name", ["general-text", "stdlib-docs"])
def test_keep_sets_are_plain_text(name: str) -> None:
    w = load_workload(f"{name}:8")
    assert w.prompt_format == "plain" and set(w.prompts) == {""} and len(set(w.solutions or ())) == 8
    assert all(len(s) >= 200 for s in w.solutions or ())


def test_held_out_docstrings_are_none_a_recipe_trains_on() -> None:
    """Every recipe on stdlib docs trains on the first steps x batch of the seed-0 order; the keep set is after them."""
    from surgery.demo import pairs

    recipes = [r for r in vars(pairs).values() if isinstance(r, pairs.Recipe) and r.data == "stdlib-docs"]
    assert recipes and all(r.seed == 0 and r.steps * r.batch_size <= DOCS_TRAINED for r in recipes)
    order = stdlib_docstrings()
    random.Random(0).shuffle(order)
    trained = set(order[:DOCS_TRAINED])
    held_out = held_out_docstrings()
    assert len(held_out) >= 64
    assert not any(t.startswith(h) for h in held_out for t in trained)
    assert all(len(h) <= DOC_CHARS for h in held_out)


def test_encode_gold_uses_rendered_prompts_as_they_are(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from surgery.analysis.nll import encode_gold

    save_tokenizer(tmp_path / "tok", chat=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    plain = encode_gold(tok, PromptSet("p", ("", ""), ("ab cd", "x"), "plain"), chat=True)
    for text, prompt, solution in zip(("ab cd", "x"), plain.prompts, plain.solutions, strict=True):
        # Plain text: BOS (if the tokenizer has one) or the first token conditions the rest, never a template.
        assert prompt + solution == tok(text)["input_ids"] and len(prompt) == 1
    assert not plain.chat
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=False)
    chat = encode_gold(tok, PromptSet("c", (rendered,), ("s",), "chat"), chat=False)
    assert chat.prompts == [tok(rendered, add_special_tokens=False)["input_ids"]] and chat.chat
    # The same prompt to render goes through the template once, as profile renders it.
    fresh = encode_gold(tok, PromptSet("f", ("q",), ("s",)), chat=True)
    assert fresh.prompts == chat.prompts
