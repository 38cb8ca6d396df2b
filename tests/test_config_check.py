"""Checkpoints whose config.json lies about the tensors: refused before any model is built (issue 12)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery import open_checkpoint
from surgery.evaluation.metrics import wilson_interval
from tests.helpers import TINY, cli, make_model, refused, save_tokenizer, timed_cli

FOUR = {"num_hidden_layers": 4}


@pytest.fixture(scope="module")
def models_by_arch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("config")
    out = {}
    for arch in ("llama", "qwen2", "gemma3"):
        extra = {"head_dim": 8} if arch == "gemma3" else {}
        out[arch] = make_model(root / arch, 3, arch=arch, **FOUR, **extra)
        save_tokenizer(out[arch])
    return out


def lying(models_by_arch: dict[str, Path], tmp_path: Path, arch: str = "llama", **changes: object) -> Path:
    path = tmp_path / f"{arch}-lying"
    shutil.copytree(models_by_arch[arch], path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def refused_in_time(args: tuple, message: str, *, watch: Path) -> None:
    """`refused`, and within 10 s: the lie is caught from config.json and the headers, before any model is built."""
    start = time.perf_counter()
    result = refused(args, message, watch=watch)
    seconds = time.perf_counter() - start
    assert result.output.rstrip("\n").split("\n")[-1] == result.stderr.rstrip("\n"), "the error is not the last line"
    assert seconds < 10, f"took {seconds:.1f} s"


LAYERS = "config.json says num_hidden_layers=200000 but the checkpoint has tensors for 4 layers (model.layers.0-3)"


def test_200000_layers_are_refused_by_every_command_that_builds(models_by_arch, tmp_path: Path) -> None:
    bad = lying(models_by_arch, tmp_path, num_hidden_layers=200000)
    good = models_by_arch["llama"]
    w = tmp_path / "w.jsonl"
    w.write_text(json.dumps({"prompt": "1+1"}) + "\n")
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    for args in (
        ("compat", good, bad),
        ("transplant", "-t", bad, "-s", good, "-o", tmp_path / "o1", "--module", "*.mlp.*"),
        ("transplant", "-t", good, "-s", bad, "-o", tmp_path / "o2", "--module", "*.mlp.*"),
        ("profile", bad, "-w", w, "-o", tmp_path / "s.safetensors"),
        ("analyze", "-s", good, "-t", bad, "-w", w, "--method", "lae", "-o", tmp_path / "m.json"),
        ("eval", bad, "-b", bench, "-o", tmp_path / "r"),
    ):
        refused_in_time(args, LAYERS, watch=tmp_path)
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "s.safetensors", "m.json", "r"))


def test_inspect_names_the_disagreement_instead_of_refusing(models_by_arch, tmp_path: Path) -> None:
    result, seconds = timed_cli("inspect", lying(models_by_arch, tmp_path, num_hidden_layers=200000))
    assert result.exit_code == 0 and seconds < 10
    assert f"config           {LAYERS}" in result.output
    result = cli("inspect", models_by_arch["llama"])
    assert "config           matches the tensors" in result.output


def test_a_qwen2_lie_is_one_line_not_transformers_traceback(models_by_arch, tmp_path: Path) -> None:
    # transformers' own validation would raise StrictDataclassClassValidationError with a traceback.
    bad = lying(models_by_arch, tmp_path, "qwen2", num_hidden_layers=7)
    refused_in_time(
        ("compat", bad, bad),
        "config.json says num_hidden_layers=7 but the checkpoint has tensors for 4 layers",
        watch=tmp_path,
    )
    # A lie our check does not cover (layer_types disagreeing with num_hidden_layers) is still one line.
    odd = lying(models_by_arch, tmp_path / "x", "qwen2", layer_types=["full_attention"] * 3)
    refused_in_time(("compat", odd, odd), "transformers cannot load this config offline", watch=tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", 48, "config.json says hidden_size=48 but the checkpoint has embeddings of width 32"),
        ("intermediate_size", 96, "config.json says intermediate_size=96 but the checkpoint has an MLP of width 64"),
        ("vocab_size", 4096, "config.json says vocab_size=4096 but the checkpoint has 128 embedding rows"),
        ("num_attention_heads", 8, "config.json says num_attention_heads=8 but the checkpoint has q_proj of 32 rows"),
        ("num_key_value_heads", 4, "config.json says num_key_value_heads=4 but the checkpoint has k_proj of 16 rows"),
    ],
)
def test_widths_that_disagree_stop_transplant(
    models_by_arch, tmp_path: Path, field: str, value: int, message: str
) -> None:
    bad = lying(models_by_arch, tmp_path, **{field: value})
    # Without the check this wrote an output from_pretrained could not load.
    refused_in_time(
        ("transplant", "-t", bad, "-s", models_by_arch["llama"], "-o", tmp_path / "out", "--module", "*"),
        message,
        watch=tmp_path,
    )
    assert not (tmp_path / "out").exists()
    assert message in cli("inspect", bad).output


def test_real_configs_match_their_tensors(models_by_arch) -> None:
    for path in models_by_arch.values():
        assert open_checkpoint(path).config_mismatches == [], path


def test_a_hostile_chat_template_is_refused_in_one_line(models_by_arch, tmp_path: Path) -> None:
    path = tmp_path / "hostile"
    shutil.copytree(models_by_arch["llama"], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    # A sandbox escape attempt: jinja's sandbox refuses the attribute, and so do we.
    config["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    refused_in_time(
        ("eval", path, "-b", bench, "-o", tmp_path / "r"), "its chat template fails to render", watch=tmp_path
    )
    w = tmp_path / "w.jsonl"
    w.write_text(json.dumps({"prompt": "1+1"}) + "\n")
    refused_in_time(
        ("profile", path, "-w", w, "-o", tmp_path / "s.safetensors"),
        "its chat template fails to render",
        watch=tmp_path,
    )


def test_wilson_bounds_at_0_and_n_are_exact() -> None:
    assert wilson_interval(0, 6)[0] == 0.0 and wilson_interval(6, 6)[1] == 1.0
    assert wilson_interval(1, 6)[0] > 0 and wilson_interval(5, 6)[1] < 1


# The property tests: numeric fields of real configs, mutated; the result is exit 2 in one line or
# the unchanged candidate list, within the time bound, never a traceback.
_HOSTILE = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 5, 7, 17, 10**6, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["x", None, [], {}]),
)
_EDGES = (0, -1, 10**6, 2**63, 0.5, "x")


def _numeric_fields(config: dict) -> list[str]:
    return sorted(k for k, v in config.items() if isinstance(v, int | float) and not isinstance(v, bool))


def _check_mutation(models_by_arch: dict[str, Path], tmp: Path, arch: str, field: str, value: object) -> None:
    bad = lying(models_by_arch, tmp, arch, **{field: value})
    result, seconds = timed_cli("compat", bad, bad)
    assert "Traceback" not in result.output and seconds < 10, (field, value, result.output, seconds)
    if result.exit_code == 2:
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    else:
        # A correct result: the tensors did not change, so neither may the candidates.
        assert result.exit_code == 0, (field, value, result.output, result.exception)
        assert (
            result.output.splitlines()[0]
            == cli("compat", models_by_arch[arch], models_by_arch[arch]).output.splitlines()[0]
        )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_every_numeric_config_field_at_its_edges(models_by_arch, tmp_path: Path, arch: str) -> None:
    config = json.loads((models_by_arch[arch] / "config.json").read_text())
    fields = _numeric_fields(config)
    assert set(TINY) <= set(fields)
    for field in fields:
        for i, value in enumerate(_EDGES):
            _check_mutation(models_by_arch, tmp_path / f"{field}-{i}", arch, field, value)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(["llama", "qwen2", "gemma3"]), pick=st.integers(0, 10**6), value=_HOSTILE)
def test_mutating_any_numeric_config_field_never_crashes(
    models_by_arch, tmp_path_factory, arch: str, pick: int, value
) -> None:
    config = json.loads((models_by_arch[arch] / "config.json").read_text())
    fields = _numeric_fields(config)
    _check_mutation(models_by_arch, tmp_path_factory.mktemp("mut"), arch, fields[pick % len(fields)], value)
