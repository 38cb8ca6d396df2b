"""`surgery select`: K chosen on held-out problems, and `transplant` taking it as its default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result
from transformers import AutoModelForCausalLM

from surgery import load_manifest
from tests.helpers import cli, make_model, noisy_target, save_tokenizer

CHANGED = ("model.layers.1.mlp.down_proj", "model.layers.3.mlp.up_proj")
QUESTIONS = [f"What is {a} plus {b}?" for a, b in ((2, 3), (7, 5), (10, 4), (6, 6), (9, 1), (3, 8), (4, 4), (5, 2))]


def _gold(path: Path, rows: list[str]) -> str:
    path.write_text("".join(json.dumps({"prompt": q, "solution": f"{q} The sum. #### 5"}) + "\n" for q in rows))
    return str(path)


@pytest.fixture(scope="module")
def noisy_pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The source is a tiny model; the target is it with CHANGED overwritten by loud noise (worse on every problem)."""
    root = tmp_path_factory.mktemp("select")
    source = make_model(root / "source", 21, num_hidden_layers=4)
    save_tokenizer(source)
    target = noisy_target(AutoModelForCausalLM.from_pretrained(source), CHANGED, root / "target")
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


def _select(noisy_pair: dict, out: Path, *extra: object) -> Result:
    return cli(
        "select", noisy_pair["manifest"], "-s", noisy_pair["source"], "-t", noisy_pair["target"], "--validation",
        noisy_pair["validation"],
        "--ks", "1,2,4", "-q", "-o", out, *extra,
    )  # fmt: skip


def test_select_picks_the_k_that_restores_the_source(noisy_pair: dict, tmp_path: Path) -> None:
    out = tmp_path / "m2.json"
    r = _select(noisy_pair, out, "--min-recovery", "99")
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


def test_no_k_reaching_the_bar_takes_the_best_and_says_so(noisy_pair: dict, tmp_path: Path) -> None:
    r = cli(
        "select", noisy_pair["manifest"], "-s", noisy_pair["source"], "-t", noisy_pair["target"], "--validation",
        noisy_pair["validation"],
        "--ks", "1", "--min-recovery", "100", "-q", "-o", tmp_path / "m2.json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    sel = load_manifest(tmp_path / "m2.json").selection
    assert sel is not None and sel.k == 1 and sel.rule.startswith("no K reached 100% Recovery")
    assert "note: no K reached" in r.output


def test_transplant_takes_the_selected_k(noisy_pair: dict, tmp_path: Path) -> None:
    m2 = tmp_path / "m2.json"
    assert _select(noisy_pair, m2, "--min-recovery", "99").exit_code == 0
    out = tmp_path / "out"
    r = cli("transplant", "-t", noisy_pair["target"], "-s", noisy_pair["source"], "-o", out, "-m", m2, "-q")
    assert r.exit_code == 0, r.output
    assert "top-k 2 from the manifest's selection" in r.output
    record = json.loads((out / "transplant.json").read_text())
    assert sorted(record["modules"]) == sorted(CHANGED) and record["selection"]["top_k"] == 2
    assert "chosen by surgery select" in (out / "README.md").read_text()
    # An explicit --top-k still wins.
    r = cli(
        "transplant",
        "-t",
        noisy_pair["target"],
        "-s",
        noisy_pair["source"],
        "-o",
        tmp_path / "o1",
        "-m",
        m2,
        "-k",
        1,
        "-q",
    )
    assert r.exit_code == 0 and len(json.loads((tmp_path / "o1" / "transplant.json").read_text())["modules"]) == 1


def test_validation_overlapping_the_ranking_is_refused(noisy_pair: dict, tmp_path: Path) -> None:
    ranked = tmp_path / "taylor.json"
    r = cli("manifest", "-s", noisy_pair["source"], "-t", noisy_pair["target"], "--method", "taylor", "-w",
            noisy_pair["validation"],
            "-q", "-o", ranked)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = cli("select", ranked, "-s", noisy_pair["source"], "-t", noisy_pair["target"], "--validation",
            noisy_pair["validation"],
            "-q", "-o", tmp_path / "m2.json")  # fmt: skip
    assert r.exit_code == 2 and "is the ranking's own" in r.output
    assert not (tmp_path / "m2.json").exists()
    # Built-in splits are reloaded, so a partial overlap is found too.
    gsm = tmp_path / "gsm.json"
    obj = json.loads(ranked.read_text())
    obj["workload"] = {**obj["workload"], "name": "gsm8k-train:4:0", "sha256": "0" * 64}
    gsm.write_text(json.dumps(obj))
    r = cli("select", gsm, "-s", noisy_pair["source"], "-t", noisy_pair["target"], "--validation", "gsm8k-train:40:0",
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
def test_bad_select_options_are_refused(noisy_pair: dict, tmp_path: Path, extra: list[str], message: str) -> None:
    args = [
        "select",
        noisy_pair["manifest"],
        "-s",
        noisy_pair["source"],
        "-t",
        noisy_pair["target"],
        "--validation",
        noisy_pair["validation"],
    ]
    r = cli(*args, "-o", tmp_path / "m2.json", *extra)
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "m2.json").exists()


def test_a_gap_within_noise_is_not_chosen_from(noisy_pair: dict, tmp_path: Path) -> None:
    # Source and target identical: the gap is exactly 0 on every problem.
    manifest = tmp_path / "same.json"
    assert cli("manifest", "-s", noisy_pair["source"], "-t", noisy_pair["source"], "--method", "random", "--seed", 1,
               "-o", manifest).exit_code == 0  # fmt: skip
    r = cli("select", manifest, "-s", noisy_pair["source"], "-t", noisy_pair["source"], "--validation",
            noisy_pair["validation"],
            "--ks", "1", "-q", "-o", tmp_path / "m2.json")  # fmt: skip
    assert r.exit_code == 2 and "within noise" in r.output and "--metric accuracy" in r.output


def test_analyze_auto_k_runs_the_whole_chain(noisy_pair: dict, tmp_path: Path) -> None:
    out = tmp_path / "auto.json"
    train = _gold(tmp_path / "train.jsonl", [f"Compute {a} times 2." for a in range(6)])
    r = cli("analyze", "-s", noisy_pair["source"], "-t", noisy_pair["target"], "-w", train, "--method", "taylor",
            "--auto-k", "--validation", noisy_pair["validation"], "-q", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    man = load_manifest(out)
    assert man.method.name == "taylor" and man.selection is not None and man.selection.k >= 1
    r = cli(
        "analyze",
        "-s",
        noisy_pair["source"],
        "-t",
        noisy_pair["target"],
        "-w",
        train,
        "--auto-k",
        "-o",
        tmp_path / "x.json",
    )
    assert r.exit_code == 2 and "--auto-k and --validation W go together" in r.output


def test_accuracy_metric_generates_and_grades(noisy_pair: dict, tmp_path: Path) -> None:
    """--metric accuracy: greedy answers graded as eval grades them; tiny random models solve nothing, so the
    source-target gap is 0 and no K is chosen from it."""
    r = cli("select", noisy_pair["manifest"], "-s", noisy_pair["source"], "-t", noisy_pair["target"], "--validation",
            noisy_pair["validation"],
            "--ks", "1", "--metric", "accuracy", "--max-new-tokens", "3", "-q", "-o", tmp_path / "m2.json")  # fmt: skip
    assert r.exit_code == 2 and "accuracy gap on the 8 validation problems is within noise" in r.output
    assert "use more validation problems" in r.output and not (tmp_path / "m2.json").exists()


def test_selected_k_is_refused_where_select_did_not_measure_it(noisy_pair: dict, tmp_path: Path) -> None:
    """select measured the top K of all modules on its own pair: filters, or --force with other checkpoints,
    would take another selection under that K, so they need an explicit --top-k (issue 25 item 4)."""
    m2 = tmp_path / "m2.json"
    assert _select(noisy_pair, m2, "--min-recovery", "99").exit_code == 0
    run = (
        "transplant",
        "-t",
        noisy_pair["target"],
        "-s",
        noisy_pair["source"],
        "-o",
        tmp_path / "out",
        "-q",
    )
    for extra, named in ((["--only", "mlp"], "--only mlp"), (["--layers", "3"], "--layers 3-3")):
        r = cli(*run, "-m", m2, *extra)
        assert r.exit_code == 2, r.output
        assert f"K=2 was chosen by `surgery select` for the top 2 of all its modules, not with {named}" in r.output
        assert "pass --top-k K" in r.output and not (tmp_path / "out").exists()
    foreign = tmp_path / "foreign.json"
    obj = json.loads(m2.read_text())
    obj["target"]["fingerprint"] = "sha256:" + "1" * 64
    foreign.write_text(json.dumps(obj))
    r = cli(*run, "-m", foreign, "--force")
    assert r.exit_code == 2 and "was measured by `surgery select` on the checkpoints it was made for" in r.output
    assert not (tmp_path / "out").exists()
    # An explicit K is the user's choice: it goes with the filters.
    r = cli(*run, "-m", m2, "--only", "mlp", "-k", 1)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "transplant.json").read_text())["modules"] == ["model.layers.3.mlp.up_proj"]


def test_analyze_auto_k_takes_select_options(noisy_pair: dict, tmp_path: Path) -> None:
    """--ks (or -k), --min-recovery and --metric, as select takes them (issue 25 item 5)."""
    out = tmp_path / "auto.json"
    train = _gold(tmp_path / "train.jsonl", [f"Compute {a} times 2." for a in range(6)])
    r = cli("analyze", "-s", noisy_pair["source"], "-t", noisy_pair["target"], "-w", train, "--method", "weight-delta",
            "--auto-k", "--validation", noisy_pair["validation"], "-k", "1,2", "--min-recovery", 99, "--metric", "nll",
            "-q", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    sel = load_manifest(out).selection
    assert sel is not None and [p.k for p in sel.curve] == [1, 2] and sel.k == 2 and "Recovery >= 99%" in sel.rule
    assert "| 2 (chosen) |" in r.output
    r = cli("analyze", "-s", noisy_pair["source"], "-t", noisy_pair["target"], "-w", train, "--metric", "nll",
            "-o", tmp_path / "x.json")  # fmt: skip
    assert r.exit_code == 2 and "--metric applies with --auto-k --validation W" in r.output
    assert not (tmp_path / "x.json").exists()


def test_select_refuses_to_replace_the_png_beside_its_output(noisy_pair: dict, tmp_path: Path) -> None:
    """The curve's PNG is an output too: the -o/--overwrite rule, checked before any work (issue 25 item 7b)."""
    out = tmp_path / "m2.json"
    (tmp_path / "m2.png").write_bytes(b"someone's picture")
    r = _select(noisy_pair, out)
    assert r.exit_code == 2, r.output
    assert f"output {tmp_path / 'm2.png'} already exists; choose a new path or pass --overwrite" in r.output
    assert "validation problems" not in r.output  # refused before measuring anything
    assert (tmp_path / "m2.png").read_bytes() == b"someone's picture" and not out.exists()
    r = _select(noisy_pair, out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m2.png").read_bytes().startswith(b"\x89PNG")


def test_select_takes_the_manifest_with_m_and_k_values_with_k(noisy_pair: dict, tmp_path: Path) -> None:
    """-m as transplant and sweep take it (MANIFEST still works); -k/--k as sweep spells --ks (issue 25 item 10)."""
    r = cli("select", "-m", noisy_pair["manifest"], "-s", noisy_pair["source"], "-t", noisy_pair["target"],
            "--validation", noisy_pair["validation"], "-k", "1,2", "-q", "-o", tmp_path / "m2.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    sel = load_manifest(tmp_path / "m2.json").selection
    assert sel is not None and [p.k for p in sel.curve] == [1, 2]
    r = cli("select", noisy_pair["manifest"], "-m", noisy_pair["manifest"], "-s", noisy_pair["source"], "-t",
            noisy_pair["target"],
            "--validation", noisy_pair["validation"], "-o", tmp_path / "m3.json")  # fmt: skip
    assert r.exit_code == 2 and "name the manifest either as MANIFEST or with -m, not both" in r.output


def test_select_names_the_checkpoint_the_manifest_was_not_ranked_for(noisy_pair: dict, tmp_path: Path) -> None:
    """Only the source differs here, so only the source is named (issue 25 item 10)."""
    r = cli("select", noisy_pair["manifest"], "-s", noisy_pair["target"], "-t", noisy_pair["target"], "--validation",
            noisy_pair["validation"], "-q", "-o", tmp_path / "m2.json")  # fmt: skip
    assert r.exit_code == 2, r.output
    ref = load_manifest(noisy_pair["manifest"]).source
    assert r.output == (
        f"error: {noisy_pair['manifest']}: manifest was made for source {ref.path} ({ref.fingerprint[:19]}…), "
        f"not {Path(noisy_pair['target']).resolve()}; pass the checkpoints it was made for\n"
    )


def test_library_select_returns_its_table_and_prints_none(noisy_pair: dict, tmp_path: Path, capsys) -> None:
    """The table comes back in the result for the caller to print; stdout stays empty (issue 25 item 11b)."""
    from surgery.evaluation.select import choose_k

    result = choose_k(noisy_pair["manifest"], noisy_pair["validation"], tmp_path / "m2.json",
                    source=noisy_pair["source"],
                    target=noisy_pair["target"], ks="1,2", min_recovery=99)  # fmt: skip
    assert result.selection.k == 2 and result.table.splitlines()[0] == "| K | mean gold NLL | Recovery [95% CI] |"
    assert "| 2 (chosen) |" in result.table
    assert capsys.readouterr().out == ""
