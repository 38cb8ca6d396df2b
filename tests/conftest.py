"""Fixtures shared by the test modules; plain helpers (tiny models, the CLI, `refused`) are in tests/helpers.py.
Nothing touches the network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery.analysis.profiling import profile
from surgery.checkpoints.cache import CACHE_ENV
from tests.helpers import make_model, model_with_tokenizer, save_tokenizer


@pytest.fixture(autouse=True)
def candidate_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own empty candidate cache (never the user's ~/.cache), subprocesses included."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="session")
def sharded_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A sharded fp32 Llama source/target pair with different weights (no tokenizer)."""
    root = tmp_path_factory.mktemp("pair")
    return (
        make_model(root / "source", 1, shard="20KB"),
        make_model(root / "target", 2, shard="20KB"),
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    """A 4-layer target and sources with chosen modules' weights scaled by 4, profiled at 1 token."""
    root = tmp_path_factory.mktemp("planted")
    target = model_with_tokenizer(root / "target", 5, num_hidden_layers=4)
    w = root / "w.jsonl"
    w.write_text(
        "\n".join(
            json.dumps({"prompt": p}) for p in ["What is 2+2?", "hi", "Count to ten, please.", "Name a prime number."]
        )
    )
    tgt_stats = profile(target, str(w), None, max_new_tokens=1)

    def make_source(module: str):
        path = root / module.replace(".", "_")
        lm = AutoModelForCausalLM.from_pretrained(target)
        with torch.no_grad():
            lm.get_submodule(module).weight.mul_(4)
        lm.save_pretrained(path)
        save_tokenizer(path)
        return path, profile(path, str(w), None, max_new_tokens=1)

    return target, tgt_stats, make_source
