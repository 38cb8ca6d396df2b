"""`surgery select`: K chosen on held-out problems, and `transplant` taking it as its default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from transformers import AutoModelForCausalLM

from surgery import load_manifest
from surgery.cli import main
from tests.conftest import make_model, save_tokenizer

CHANGED = ("model.layers.1.mlp.down_proj", "model.layers.3.mlp.up_proj")
QUESTIONS = [f"What is {a} plus {b}?" for a, b in ((2, 3), (7, 5), (10, 4), (6, 6), (9, 1), (3, 8), (4, 4), (5, 2))]


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _gold(path: Path, rows: list[str]) -> str:
    path.write_text("".join(json.dumps({"prompt": q, "solution": f"{q} The sum. #### 5"}) + "\n" for q in rows))
    return str(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The source is a tiny model; the target is it with CHANGED overwritten by loud noise (worse on every problem)."""
    root = tmp_path_factory.mktemp("select")
    source = make_model(root / "source", 21, num_hidden_layers=4)
    save_tokenizer(source)
    lm = AutoModelForCausalLM.from_pretrained(source)
    torch.manual_seed(1)
    with torch.no_grad():
        for name in CHANGED:
            w = lm.get_submodule(name).weight
            w.copy_(torch.randn_like(w) * 2.0)
    target = root / "target"
    lm.save_pretrained(target)
    save_tokenizer(target)
    manifest = root / "m.json"
    r = cli("manifest", "-s", source, "-t", target, "--method", "weight-delta", "-o", manifest)
    assert r.exit_code == 0, r.output
    assert {m.name for m in load_manifest(manifest).modules[:2]} == set(CHANGED)
    return {
        "source": source,
        "target": target,
        "manifest": manifest,
        "validation": _gold(root / "val.jsonl", QUESTIONS),
        "root": root,
    }


def _select(pair: dict, out: Path, *extra: object) -> Result:
    return cli(
        "select", pair["manifest"], "-s", pair["source"], "-t", pair["target"], "--validation", pair["validation"],
        "--ks", "1,2,4", "-q", "-o", out, *extra,
    )  # fmt: skip


def test_select_picks_the_k_that_restores_the_source(pair: dict, tmp_path: Path) -> None:
    out = tmp_path / "m2.json"
    r = _select(pair, out, "--min-recovery", "99")
    assert r.exit_code == 0, r.output
    sel = load_manifest(out).selection
    assert sel is not None and sel.k == 2 and sel.metric == "nll"
    by_k = {p.k: p for p in sel.curve}
    # Both changed modules swapped back: the target is the source in every differing tensor.
    assert by_k[2].value == pytest.approx(sel.baselines["source"], abs=1e-9)
    assert by_k[2].recovery == pytest.approx(100.0) and by_k[4].recovery == pytest.approx(100.0)
    assert by_k[1].recovery is not None and by_k[1].recovery < 99
    assert sel.validation["count"] == 8 and "smallest K" in sel.rule
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "| 2 (chosen) |" in r.output


def test_no_k_reaching_the_bar_takes_the_best_and_says_so(pair: dict, tmp_path: Path) -> None:
    r = cli(
        "select", pair["manifest"], "-s", pair["source"], "-t", pair["target"], "--validation", pair["validation"],
        "--ks", "1", "--min-recovery", "100", "-q", "-o", tmp_path / "m2.json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    sel = load_manifest(tmp_path / "m2.json").selection
    assert sel is not None and sel.k == 1 and sel.rule.startswith("no K reached 100% Recovery")
    assert "note: no K reached" in r.output


def test_transplant_takes_the_selected_k(pair: dict, tmp_path: Path) -> None:
    m2 = tmp_path / "m2.json"
    assert _select(pair, m2, "--min-recovery", "99").exit_code == 0
    out = tmp_path / "out"
    r = cli("transplant", "-t", pair["target"], "-s", pair["source"], "-o", out, "-m", m2, "-q")
    assert r.exit_code == 0, r.output
    assert "top-k 2 from the manifest's selection" in r.output
    record = json.loads((out / "transplant.json").read_text())
    assert sorted(record["modules"]) == sorted(CHANGED) and record["selection"]["top_k"] == 2
    assert "chosen by surgery select" in (out / "README.md").read_text()
    # An explicit --top-k still wins.
    r = cli("transplant", "-t", pair["target"], "-s", pair["source"], "-o", tmp_path / "o1", "-m", m2, "-k", 1, "-q")
    assert r.exit_code == 0 and len(json.loads((tmp_path / "o1" / "transplant.json").read_text())["modules"]) == 1


def test_validation_overlapping_the_ranking_is_refused(pair: dict, tmp_path: Path) -> None:
    ranked = tmp_path / "taylor.json"
    r = cli("manifest", "-s", pair["source"], "-t", pair["target"], "--method", "taylor", "-w", pair["validation"],
            "-q", "-o", ranked)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = cli("select", ranked, "-s", pair["source"], "-t", pair["target"], "--validation", pair["validation"],
            "-q", "-o", tmp_path / "m2.json")  # fmt: skip
    assert r.exit_code == 2 and "is the ranking's own" in r.output
    assert not (tmp_path / "m2.json").exists()
    # Built-in splits are reloaded, so a partial overlap is found too.
    gsm = tmp_path / "gsm.json"
    obj = json.loads(ranked.read_text())
    obj["workload"] = {**obj["workload"], "name": "gsm8k-train:4:0", "sha256": "0" * 64}
    gsm.write_text(json.dumps(obj))
    r = cli("select", gsm, "-s", pair["source"], "-t", pair["target"], "--validation", "gsm8k-train:40:0",
            "--ks", "1", "-q", "-o", tmp_path / "m3.json")  # fmt: skip
    assert r.exit_code == 2 and "shares" in r.output and "prompts with the ranking workload" in r.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ks", "0,2"], "--ks '0,2' must list K values of at least 1"),
        (["--ks", "-1"], "--ks '-1' must list K values of at least 1"),
        (["--ks", "999"], "--ks 999 is more than the manifest's"),
        (["--min-recovery", "150"], "--min-recovery 150.0 is outside 0-100"),
    ],
)
def test_bad_select_options_are_refused(pair: dict, tmp_path: Path, extra: list[str], message: str) -> None:
    args = ["select", pair["manifest"], "-s", pair["source"], "-t", pair["target"], "--validation", pair["validation"]]
    r = cli(*args, "-o", tmp_path / "m2.json", *extra)
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "m2.json").exists()


def test_a_gap_within_noise_is_not_chosen_from(pair: dict, tmp_path: Path) -> None:
    # Source and target identical: the gap is exactly 0 on every problem.
    manifest = tmp_path / "same.json"
    assert cli("manifest", "-s", pair["source"], "-t", pair["source"], "--method", "random", "--seed", 1,
               "-o", manifest).exit_code == 0  # fmt: skip
    r = cli("select", manifest, "-s", pair["source"], "-t", pair["source"], "--validation", pair["validation"],
            "--ks", "1", "-q", "-o", tmp_path / "m2.json")  # fmt: skip
    assert r.exit_code == 2 and "within noise" in r.output and "--metric accuracy" in r.output


def test_analyze_auto_k_runs_the_whole_chain(pair: dict, tmp_path: Path) -> None:
    out = tmp_path / "auto.json"
    train = _gold(tmp_path / "train.jsonl", [f"Compute {a} times 2." for a in range(6)])
    r = cli("analyze", "-s", pair["source"], "-t", pair["target"], "-w", train, "--method", "taylor",
            "--auto-k", "--validation", pair["validation"], "-q", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    man = load_manifest(out)
    assert man.method.name == "taylor" and man.selection is not None and man.selection.k >= 1
    r = cli("analyze", "-s", pair["source"], "-t", pair["target"], "-w", train, "--auto-k", "-o", tmp_path / "x.json")
    assert r.exit_code == 2 and "--auto-k and --validation W go together" in r.output


def test_accuracy_metric_generates_and_grades(pair: dict, tmp_path: Path) -> None:
    """--metric accuracy: greedy answers graded as eval grades them; tiny random models solve nothing, so the
    source-target gap is 0 and no K is chosen from it."""
    r = cli("select", pair["manifest"], "-s", pair["source"], "-t", pair["target"], "--validation", pair["validation"],
            "--ks", "1", "--metric", "accuracy", "--max-new-tokens", "3", "-q", "-o", tmp_path / "m2.json")  # fmt: skip
    assert r.exit_code == 2 and "accuracy gap on the 8 validation problems is within noise" in r.output
    assert "use more validation problems" in r.output and not (tmp_path / "m2.json").exists()
