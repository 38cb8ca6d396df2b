"""`surgery import-gguf`: a tiny GGUF written here round-trips into a safetensors folder with equal logits."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery.checkpoints.folder import open_checkpoint
from surgery.cli import main
from surgery.errors import SurgeryError
from surgery.importers.from_gguf import import_gguf
from tests.helpers import TEXT, refused, write_gguf


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        "tied": write_gguf(root / "tied.gguf", tied=True, seed=0),
        "untied": write_gguf(root / "untied.gguf", tied=False, seed=1),
        "unsupported": write_gguf(root / "unsupported.gguf", arch="notallama"),
        "no-tokenizer": write_gguf(root / "no-tokenizer.gguf", tokenizer=False),
    }


def gguf_model(path: Path, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


IDS = torch.tensor([[5, 260, 17, 99, 271, 3, 42, 200, 266, 1]])


def test_round_trip_keeps_logits_tokenizer_and_tie(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["import-gguf", str(ggufs["tied"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out.resolve()}" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "a temp folder was left behind"

    ckpt = open_checkpoint(out)  # what `surgery inspect` validates
    assert {t.info.dtype for t in ckpt.tensors.values()} == {"F32"}
    assert "lm_head.weight" not in ckpt.tensors and ckpt.config["tie_word_embeddings"] is True
    assert ckpt.config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in ckpt.config
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 272

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(logits(reloaded, IDS), logits(gguf_model(ggufs["tied"], torch.float32), IDS))

    ours = AutoTokenizer.from_pretrained(out).encode(TEXT)
    theirs = AutoTokenizer.from_pretrained(ggufs["tied"].parent, gguf_file=ggufs["tied"].name).encode(TEXT)
    assert ours == theirs
    assert len(ours) < len(TEXT.encode()), "the merges were not applied"


def test_a_log_gets_no_redrawn_bars(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    """stderr captured (not a terminal, as in `make demo`'s log): no `\\r` bar of transformers' reaches it."""
    result = CliRunner().invoke(main, ["import-gguf", str(ggufs["tied"]), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr, repr(result.stderr)
    assert "GGUF tensors" not in result.stderr and "Writing model shards" not in result.stderr, result.stderr


def test_quiet_turns_the_bars_off_on_a_terminal_too(
    tmp_path: Path, ggufs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """-q reaches the switch that turns transformers' bars (the converter's too) on or off."""
    import surgery.checkpoints.loading as loading

    asked, switch = [], loading.transformers_bars

    def recorded(progress: bool):
        asked.append(progress)
        return switch(progress)

    monkeypatch.setattr(loading, "transformers_bars", recorded)
    for extra, name in (([], "bars"), (["-q"], "quiet")):
        result = CliRunner().invoke(main, ["import-gguf", str(ggufs["tied"]), "-o", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    assert asked[0] is True and asked[-1] is False


def test_bfloat16_untied(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    out = import_gguf(ggufs["untied"], tmp_path / "bf16", dtype="bfloat16")
    assert out == (tmp_path / "bf16").resolve()
    ckpt = open_checkpoint(out)
    assert {t.info.dtype for t in ckpt.tensors.values()} == {"BF16"}
    assert "lm_head.weight" in ckpt.tensors and ckpt.config["tie_word_embeddings"] is False
    assert ckpt.config["dtype"] == "bfloat16"

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(logits(reloaded, IDS), logits(gguf_model(ggufs["untied"], torch.bfloat16), IDS))


def test_overwrite_replaces_only_when_asked(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    import_gguf(ggufs["tied"], out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # The file's own folder as OUT would lose the GGUF to --overwrite.
    with pytest.raises(SurgeryError, match="contains the GGUF file checkpoint"):
        import_gguf(ggufs["tied"], ggufs["tied"].parent, overwrite=True)
    with pytest.raises(SurgeryError, match="--dtype 'int8' is not supported"):
        import_gguf(ggufs["tied"], tmp_path / "new", dtype="int8")
    assert not (tmp_path / "new").exists()


def _truncated(root: Path, ggufs: dict[str, Path]) -> Path:
    data = ggufs["untied"].read_bytes()
    (root / "cut.gguf").write_bytes(data[: len(data) - 100])  # ends inside output.weight
    return root / "cut.gguf"


def _garbage_after_magic(root: Path, ggufs: dict[str, Path]) -> Path:
    (root / "garbage.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    return root / "garbage.gguf"


def _random_bytes(root: Path, ggufs: dict[str, Path]) -> Path:
    (root / "random.gguf").write_bytes(os.urandom(4096))
    return root / "random.gguf"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_truncated, "is a corrupt or truncated GGUF"),
        (_garbage_after_magic, "is a corrupt or truncated GGUF"),
        (_random_bytes, "is not a GGUF file"),
        (lambda root, ggufs: ggufs["unsupported"], "GGUF architecture 'notallama' is not supported"),
        (lambda root, ggufs: ggufs["no-tokenizer"], "cannot build its tokenizer"),
        (lambda root, ggufs: root / "missing.gguf", "does not exist"),
        (lambda root, ggufs: root, "is a folder, not a file"),
    ],
    ids=["truncated", "garbage", "random", "unsupported-arch", "no-tokenizer", "missing", "folder"],
)
def test_bad_gguf_is_refused(tmp_path: Path, ggufs: dict[str, Path], make, message: str) -> None:
    src = make(tmp_path, ggufs)
    out = tmp_path / "out"
    refused(["import-gguf", src, "-o", out], message, watch=tmp_path)
    assert not out.exists()


def test_unsupported_message_lists_supported(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    with pytest.raises(SurgeryError, match=r"supported: .*llama.*qwen2") as e:
        import_gguf(ggufs["unsupported"], tmp_path / "out")
    assert "\n" not in str(e.value)


def test_existing_out_is_refused(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(
        ["import-gguf", ggufs["tied"], "-o", out],
        "already exists; choose a new path or pass --overwrite",
        watch=tmp_path,
    )
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_gguf_package_is_refused(tmp_path: Path, ggufs: dict[str, Path], monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    refused(["import-gguf", ggufs["tied"], "-o", tmp_path / "out"], "pip install gguf", watch=tmp_path)
    assert not (tmp_path / "out").exists()
