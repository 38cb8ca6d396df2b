"""Candidate modules and `surgery compat`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgery import SurgeryError, find_candidates, open_checkpoint
from surgery.checkpoints.cache import CACHE_ENV
from surgery.checkpoints.candidates import module_kind, module_layer
from surgery.cli import main
from tests.helpers import cli, make_model

LLAMA_PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_llama_candidates(sharded_pair: tuple[Path, Path]) -> None:
    compat = find_candidates(*(open_checkpoint(p) for p in sharded_pair))
    assert len(compat.candidates) == 14
    assert {c.name.rsplit(".", 1)[1] for c in compat.candidates} == LLAMA_PROJ
    q = next(c for c in compat.candidates if c.name == "model.layers.1.self_attn.q_proj")
    assert (q.kind, q.layer, q.tensors, q.shape) == ("attn", 1, ("model.layers.1.self_attn.q_proj.weight",), (32, 32))
    down = next(c for c in compat.candidates if c.name == "model.layers.0.mlp.down_proj")
    assert (down.kind, down.layer, down.shape) == ("mlp", 0, (32, 64))
    reasons = dict((e.name, e.reason) for e in compat.excluded)
    assert set(reasons) == {
        "model.embed_tokens",
        "model.norm",
        "lm_head",
        *(f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")),
    }
    assert "embedding" in reasons["model.embed_tokens"] and "lm_head" in reasons["lm_head"]
    assert compat.summary() == "14 transplantable modules in 2 layers (8 attn, 6 mlp); 7 excluded"


def test_qwen2_biases_travel_with_their_module(tmp_path: Path) -> None:
    src = open_checkpoint(make_model(tmp_path / "s", 1, arch="qwen2"))
    tgt = open_checkpoint(make_model(tmp_path / "t", 2, arch="qwen2"))
    by_name = {c.name: c for c in find_candidates(src, tgt).candidates}
    assert by_name["model.layers.0.self_attn.k_proj"].tensors == (
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
    )
    assert by_name["model.layers.0.self_attn.o_proj"].tensors == ("model.layers.0.self_attn.o_proj.weight",)


def test_shape_mismatch_is_excluded_with_reason(tmp_path: Path) -> None:
    src = open_checkpoint(make_model(tmp_path / "s", 1, intermediate_size=48))
    tgt = open_checkpoint(make_model(tmp_path / "t", 2))
    compat = find_candidates(src, tgt)
    assert {c.kind for c in compat.candidates} == {"attn"}
    reasons = dict((e.name, e.reason) for e in compat.excluded)
    assert reasons["model.layers.0.mlp.up_proj"] == (
        "shape differs for model.layers.0.mlp.up_proj.weight: source [48, 32], target [64, 32]"
    )


def test_tied_embeddings_have_no_lm_head_tensor(tmp_path: Path) -> None:
    src = open_checkpoint(make_model(tmp_path / "s", 1, tied=True))
    tgt = open_checkpoint(make_model(tmp_path / "t", 2, tied=True))
    compat = find_candidates(src, tgt)
    assert "lm_head.weight" not in tgt.tensors
    assert len(compat.candidates) == 14 and "lm_head" in dict((e.name, e.reason) for e in compat.excluded)


def test_compat_cli_text_and_json(sharded_pair: tuple[Path, Path]) -> None:
    text = cli("compat", *sharded_pair)
    assert text.exit_code == 0
    assert text.stdout.splitlines()[0] == "14 transplantable modules in 2 layers (8 attn, 6 mlp); 7 excluded"
    assert "excluded model.norm: normalization layer (LlamaRMSNorm) is not transplanted" in text.stdout
    # The text lists the candidates too, as the errors pointing at `surgery compat` promise.
    assert sum(line.startswith("  candidate ") for line in text.stdout.splitlines()) == 14
    assert "  candidate model.layers.1.mlp.down_proj (mlp, 32x64)" in text.stdout
    obj = json.loads(cli("compat", *sharded_pair, "--json").stdout)
    assert len(obj["candidates"]) == 14 and len(obj["excluded"]) == 7


def test_different_architectures_exit_2(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    qwen = make_model(tmp_path / "q", 1, arch="qwen2")
    with pytest.raises(SurgeryError, match="architectures differ"):
        find_candidates(open_checkpoint(qwen), open_checkpoint(sharded_pair[1]))
    result = CliRunner().invoke(main, ["compat", str(qwen), str(sharded_pair[1])])
    assert result.exit_code == 2 and "architectures differ: source is qwen2" in result.stderr


def test_custom_code_config_is_refused_without_trust(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "s", 1)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Config"}}))
    ckpt = open_checkpoint(folder)
    with pytest.raises(SurgeryError, match="--trust-remote-code"):
        find_candidates(ckpt, ckpt)


def test_unknown_model_type_names_trust_remote_code(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "s", 1)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    ckpt = open_checkpoint(folder)
    with pytest.raises(SurgeryError, match="cannot load this config offline"):
        find_candidates(ckpt, ckpt)


@pytest.mark.parametrize(
    ("name", "kind", "layer"),
    [
        ("model.layers.12.self_attn.qkv_proj", "attn", 12),
        ("model.layers.3.mlp.gate_up_proj", "mlp", 3),
        ("transformer.h.7.attn.c_attn", "attn", 7),
        ("model.layers.0.block_sparse_moe.gate", "other", 0),
        ("score", "other", None),
    ],
)
def test_kind_and_layer_from_name(name: str, kind: str, layer: int | None) -> None:
    assert (module_kind(name), module_layer(name)) == (kind, layer)


def test_candidates_are_cached_by_config_and_layout(
    tmp_path: Path, sharded_pair: tuple[Path, Path], candidate_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second match of the same layout skips building the model; another layout or a broken entry does not."""
    import surgery.checkpoints.candidates as candidates

    src, tgt = open_checkpoint(sharded_pair[0]), open_checkpoint(sharded_pair[1])
    first = find_candidates(src, tgt)
    assert len(list(candidate_cache.rglob("*.json"))) == 1

    def no_build(*_: object) -> None:
        raise AssertionError("the model was built although the match is cached")

    monkeypatch.setattr(candidates, "meta_model", no_build)
    assert find_candidates(src, tgt) == first
    # Another layout (a wider MLP) is another key: built, not read from the cache.
    wide = make_model(tmp_path / "wide", 1, intermediate_size=96)
    with pytest.raises(AssertionError, match="was built"):
        find_candidates(open_checkpoint(wide), open_checkpoint(wide))
    # An unreadable entry is recomputed and rewritten.
    monkeypatch.undo()
    monkeypatch.setenv(CACHE_ENV, str(candidate_cache))
    (entry,) = candidate_cache.rglob("*.json")
    entry.write_text("{not json")
    assert find_candidates(src, tgt) == first
    assert json.loads(entry.read_text())["candidates"][0]["name"] == first.candidates[0].name
