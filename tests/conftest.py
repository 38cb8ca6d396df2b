"""Tiny local models and helpers shared by the tests. Nothing touches the network."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from surgery.checkpoints.cache import CACHE_ENV
from surgery.checkpoints.candidates import find_candidates
from surgery.checkpoints.folder import open_checkpoint
from surgery.manifest import SCHEMA_VERSION

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}


def make_model(
    path: Path,
    seed: int,
    *,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    tied: bool = False,
    shard: str | None = None,
    **overrides: int,
) -> Path:
    """Save a randomly initialised tiny model (plus a fake tokenizer file) to `path`."""
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma3": Gemma3TextConfig}[arch]
    config = config_cls(**{**TINY, **overrides}, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    # Random init leaves norms at 1 and biases at 0; perturb everything so a wrong
    # origin is visible in every tensor.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, to prove inputs were not modified."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_manifest(path: Path, source: Path, target: Path, *, reverse: bool = False) -> Path:
    """Write a valid manifest ranking the candidates in module order (or reversed)."""
    src, tgt = open_checkpoint(source), open_checkpoint(target)
    compat = find_candidates(src, tgt)
    cands = list(reversed(compat.candidates)) if reverse else list(compat.candidates)
    obj = {
        "schema_version": SCHEMA_VERSION,
        "created_by": "tests",
        "source": {"path": str(source), "revision": None, "fingerprint": src.fingerprint},
        "target": {"path": str(target), "revision": None, "fingerprint": tgt.fingerprint},
        "workload": {"name": "test", "sha256": "0" * 64, "prompts": 4, "max_new_tokens": 8},
        "method": {"name": "lae", "params": {}},
        "modules": [
            {
                "name": c.name,
                "kind": c.kind,
                "layer": c.layer,
                "tensors": list(c.tensors),
                "shape": list(c.shape),
                "a_src": 1.0,
                "a_tgt": 0.5,
                "score": float(len(cands) - i),
                "rank": i + 1,
            }
            for i, c in enumerate(cands)
        ],
        "excluded": [{"name": e.name, "reason": e.reason} for e in compat.excluded],
    }
    path.write_text(json.dumps(obj, indent=2))
    return path


@pytest.fixture(autouse=True)
def candidate_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own empty candidate cache (never the user's ~/.cache), subprocesses included."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A sharded fp32 Llama source/target pair with different weights."""
    root = tmp_path_factory.mktemp("pair")
    return (
        make_model(root / "source", 1, shard="20KB"),
        make_model(root / "target", 2, shard="20KB"),
    )


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def save_tokenizer(path: Path, chat: bool = True) -> None:
    """A character-level tokenizer over ids 0..127 (fits TINY's vocab), saved next to a model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join back without spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="no torchrun beside this python")


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m surgery ARGS` on a free port, one thread per process (gloo on the CPU)."""
    with socket.socket() as sock:  # a free port, so concurrent test runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(port), "-m", "surgery", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
