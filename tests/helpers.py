"""Plain helpers the tests import: tiny local models and tokenizers, manifests, the CLI and its refusals,
broken checkpoints and a tiny GGUF. Nothing touches the network. Fixtures live in tests/conftest.py.

    from tests.helpers import cli, make_model, refused
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config
from transformers.convert_slow_tokenizer import bytes_to_unicode

from surgery.checkpoints.candidates import find_candidates
from surgery.checkpoints.folder import open_checkpoint
from surgery.cli import main
from surgery.manifest import SCHEMA_VERSION

# --- Tiny models, tokenizers, manifests -------------------------------------------------------------

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


def model_with_tokenizer(path: Path, seed: int, **kw) -> Path:
    """`make_model` plus `save_tokenizer` (with the chat template) in the same folder."""
    make_model(path, seed, **kw)
    save_tokenizer(path)
    return path


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="no torchrun beside this python")


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m surgery ARGS` on a free port, one thread per process (gloo on the CPU)."""
    with socket.socket() as sock:  # a free port, so concurrent test runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(port), "-m", "surgery", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


# --- The CLI ------------------------------------------------------------------------------------------


def cli(*args: object) -> Result:
    """`surgery ARGS` in process (click's CliRunner), every argument str()-ed."""
    return CliRunner().invoke(main, [str(a) for a in args])


def timed_cli(*args: object) -> tuple[Result, float]:
    """`cli(*args)` and the seconds it took."""
    start = time.perf_counter()
    result = cli(*args)
    return result, time.perf_counter() - start


def refused(args: list, *messages: str, watch: Path, secret: str | None = None) -> Result:
    """Run `surgery ARGS` and assert it was refused cleanly: exit code 2, one `error: ` line on stderr with
    every message in it, no traceback, nothing under `watch` written or changed (no `.surgery-tmp-` folder
    left either), and `secret` (when given) nowhere in the output."""
    before = tree_digest(watch)
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for message in messages:
        assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert tree_digest(watch) == before, "a refused command wrote or changed files"
    assert not [p for p in watch.rglob("*") if ".surgery-tmp-" in p.name]
    if secret is not None:
        assert secret not in result.output
    return result


# --- Broken checkpoints: each damage, and the message that names it ------------------------------------


def _truncate(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-5])


def _header_length(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])


def _rewrite_header(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        # The shard holding the most tensors, so there are neighbours to overlap.
        shards = Counter(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
        shard = folder / shards.most_common(1)[0][0]
        data = shard.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        change(header)
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    return apply


def _by_offset(header: dict) -> list[dict]:
    return sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda t: t["data_offsets"][0])


def _overlap(header: dict) -> None:
    # The second tensor claims the first one's bytes, with a consistent shape: only the overlap is wrong.
    first, second = _by_offset(header)[:2]
    second.update(dtype=first["dtype"], shape=first["shape"], data_offsets=list(first["data_offsets"]))


def _past_end(header: dict) -> None:
    # The last tensor doubles in size (F32 -> F64), consistent with its shape, so it ends past the file.
    last = _by_offset(header)[-1]
    begin, end = last["data_offsets"]
    last.update(dtype="F64", data_offsets=[begin, begin + 2 * (end - begin)])


def _bad_json(folder: Path) -> None:
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8] = ord("[")
    shard.write_bytes(bytes(data))


def _index(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        change(index)
        path.write_text(json.dumps(index))

    return apply


def _no_weights(folder: Path) -> None:
    for p in folder.glob("*.safetensors*"):
        p.unlink()


def _bin_only(folder: Path) -> None:
    _no_weights(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "no weights": (_no_weights, "no model.safetensors"),
    "bin only": (_bin_only, "requires safetensors. Convert with"),
    "truncated shard": (_truncate, "truncated"),
    "header longer than file": (_header_length, "runs past the end"),
    "header not JSON": (_bad_json, "header is not valid JSON"),
    "overlapping offsets": (_rewrite_header(_overlap), "overlaps the previous tensor"),
    "out of range offsets": (_rewrite_header(_past_end), "but the data region is"),
    "unknown dtype": (_rewrite_header(lambda h: _by_offset(h)[0].update(dtype="F12")), "unknown dtype 'F12'"),
    "index names missing shard": (
        _index(lambda i: i["weight_map"].update({"model.norm.weight": "model-00099-of-00099.safetensors"})),
        "which is missing",
    ),
    "index path traversal": (
        _index(lambda i: i["weight_map"].update({"model.norm.weight": "../target/model.safetensors"})),
        "not a plain file name",
    ),
}


# --- A tiny GGUF ----------------------------------------------------------------------------------------

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
# Byte-level BPE merges over GPT-2's byte alphabet (Ġ is the space); each merged pair is a new token.
MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at"), ("Ġ", "s"), ("Ġs", "at"),
    ("o", "n"), ("Ġ", "on"), ("Ġ", "m"), ("Ġm", "at"), ("i", "n"), ("Ġ", "in"), ("e", "r"), ("Ġ", "a"),
]  # fmt: skip
TEXT = "the cat sat on the mat in the sun"


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tied: bool = True,
    seed: int = 0,
    tokenizer: bool = True,
    chat_template: str | None = None,
) -> Path:
    """A tiny F32 llama GGUF with a byte-level BPE tokenizer, as llama.cpp's converter lays it out."""
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["".join(m) for m in MERGES] + ["<|endoftext|>"]
    token_types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    vocab, eos = len(tokens), len(tokens) - 1

    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-test")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types(token_types)
        w.add_token_merges([" ".join(m) for m in MERGES])
        w.add_bos_token_id(eos)
        w.add_eos_token_id(eos)
        if chat_template is not None:
            w.add_chat_template(chat_template)

    rng = np.random.default_rng(seed)

    def add(name: str, *shape: int) -> None:
        # Norm weights near 1, the rest small: finite activations, and every value matters to the logits.
        base = 1.0 if len(shape) == 1 else 0.0
        w.add_tensor(name, (base + 0.1 * rng.standard_normal(shape)).astype(np.float32))

    kv = KV_HEADS * HIDDEN // HEADS
    add("token_embd.weight", vocab, HIDDEN)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", HIDDEN)
        add(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.attn_k.weight", kv, HIDDEN)
        add(f"blk.{i}.attn_v.weight", kv, HIDDEN)
        add(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.ffn_norm.weight", HIDDEN)
        add(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    add("output_norm.weight", HIDDEN)
    if not tied:  # llama.cpp leaves the head out when it is the embedding
        add("output.weight", vocab, HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def flip_bit(folder: Path, tensor: str, at: int = 3) -> None:
    """Flip the lowest bit of byte `at` of `tensor` in the checkpoint `folder`, in place (a corrupt output)."""
    from surgery.checkpoints.folder import open_checkpoint

    ref = open_checkpoint(folder).tensors[tensor]
    with open(ref.shard.path, "r+b") as f:
        f.seek(ref.offset + at)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def noisy_target(lm: torch.nn.Module, modules: Sequence[str], target: Path) -> Path:
    """Save `lm` (a loaded source) to `target` with `modules` overwritten by loud seeded noise, and a tokenizer:
    a target worse than its source on every problem, in those modules alone."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name in modules:
            w = lm.get_submodule(name).weight
            w.copy_(torch.randn_like(w) * 2.0)
    lm.save_pretrained(target)
    save_tokenizer(target)
    return target


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint `folder`, by name, read with safetensors (the reference reader)."""
    from safetensors import safe_open

    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out
