"""`eval`, `report` and `sweep` on tiny local models: end to end, resume, data-parallel, bad input."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery import open_checkpoint
from surgery.analysis.nll import gold_nll
from surgery.checkpoints.options import ModelOptions
from surgery.checkpoints.swap import swapped
from surgery.evaluation.benchmarks import BENCHMARKS, grade
from surgery.evaluation.metrics import paired_bootstrap, recovery
from surgery.evaluation.report import Report, report, save_report
from surgery.evaluation.runner import evaluate, read_records
from tests.helpers import cli, make_model, needs_torchrun, refused, save_tokenizer, torchrun, write_manifest

QUESTIONS = [
    (f"What is {a} plus {b}?", str(a + b))
    for a, b in [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (6, 1), (8, 8), (4, 0), (12, 3), (5, 5), (9, 9), (3, 3)]
]


@pytest.fixture(scope="module")
def eval_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    src, tgt = make_model(root / "source", 1), make_model(root / "target", 2)
    for p in (src, tgt):
        save_tokenizer(p)
    bench = root / "arith.jsonl"
    bench.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    return {"source": src, "target": tgt, "bench": bench, "root": root}


def run_eval(eval_pair, out: Path, **kw) -> dict:
    """The summary as `summary.json` holds it."""
    kw = {"max_new_tokens": 6, "batch_size": 4, "options": ModelOptions(progress=False), **kw}
    return evaluate(eval_pair["target"], str(eval_pair["bench"]), out, **kw).to_dict()


def test_eval_end_to_end(tmp_path: Path, eval_pair) -> None:
    out = tmp_path / "res"
    summary = run_eval(eval_pair, out)
    records = read_records(out / "records.jsonl")
    assert [r["id"] for r in records] == [f"arith.jsonl:{i}" for i in range(1, 13)]
    for r, (_, gold) in zip(records, QUESTIONS, strict=True):
        assert r["gold"] == gold and 1 <= r["tokens"] <= 6 and r["nll"] > 0
        assert r["correct"] == grade("gsm8k", r["output"], gold)["correct"]
        assert "What is" in r["prompt"]
    correct = sum(r["correct"] for r in records)
    assert summary["correct"] == correct and summary["accuracy"] == correct / 12
    lo, hi = summary["accuracy_ci95"]
    assert 0 <= lo <= summary["accuracy"] <= hi <= 1
    assert summary["nll_mean"] == pytest.approx(sum(r["nll"] for r in records) / 12)
    assert summary["prompt_format"] == "chat" and summary["settings"]["max_new_tokens"] == 6
    assert summary["settings"]["model_fingerprint"] == open_checkpoint(eval_pair["target"]).fingerprint
    assert json.loads((out / "summary.json").read_text()) == summary


def test_batching_does_not_change_outputs(tmp_path: Path, eval_pair) -> None:
    run_eval(eval_pair, tmp_path / "b1", batch_size=1)
    run_eval(eval_pair, tmp_path / "b5", batch_size=5)
    one, five = (read_records(tmp_path / d / "records.jsonl") for d in ("b1", "b5"))
    assert [r["output"] for r in one] == [r["output"] for r in five]
    assert [r["nll"] for r in one] == pytest.approx([r["nll"] for r in five], rel=1e-4)


def test_gold_nll_is_the_teacher_forced_cross_entropy(eval_pair) -> None:
    lm = AutoModelForCausalLM.from_pretrained(eval_pair["target"]).eval()
    prompt, solution = [1, 40, 41, 42, 43], [50, 51, 52]
    with torch.no_grad():
        logits = lm(torch.tensor([prompt + solution])).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(solution)).item()
    # Batched with a longer row, so left padding is exercised too.
    got = gold_nll(lm, [prompt, [1, 60, 61, 62, 63, 64, 65, 66]], [solution, [70, 71]], pad_id=0)
    assert got[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_resume_after_kill_loses_nothing(tmp_path: Path, eval_pair) -> None:
    # Enough problems that the kill surely lands mid-run, however fast the machine.
    bench = tmp_path / "long.jsonl"
    rows = [json.dumps({"question": f"What is {i} plus 1?", "answer": str(i + 1)}) for i in range(80)]
    bench.write_text("\n".join(rows) + "\n")
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "surgery",
        "eval",
        str(eval_pair["target"]),
        "-b",
        str(bench),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "1",
        "-q",
        "-o",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_records(out / "records.jsonl")) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_records(out / "records.jsonl")
    assert 3 <= len(partial) < 80, "the kill should land mid-run"
    # A torn last line, as a kill in the middle of a write would leave, is dropped on resume.
    with open(out / "records.jsonl", "ab") as f:
        f.write(b'{"id": "long.jsonl:80", "outp')
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resumed = read_records(out / "records.jsonl")
    clean = tmp_path / "clean"
    evaluate(
        eval_pair["target"],
        str(bench),
        clean,
        max_new_tokens=6,
        batch_size=1,
        options=ModelOptions(progress=False),
    )
    fresh = read_records(clean / "records.jsonl")
    assert [r["id"] for r in resumed] == [r["id"] for r in fresh]
    assert [r["output"] for r in resumed] == [r["output"] for r in fresh]
    by_id = {r["id"]: r for r in resumed}
    assert all(by_id[r["id"]] == r for r in partial), "records written before the kill were not kept as they were"


def test_rerun_with_other_settings_is_refused(tmp_path: Path, eval_pair) -> None:
    out = tmp_path / "res"
    run_eval(eval_pair, out, limit=4)
    before = (out / "records.jsonl").read_bytes()
    result = cli(
        "eval",
        eval_pair["target"],
        "-b",
        eval_pair["bench"],
        "--limit",
        4,
        "--max-new-tokens",
        7,
        "-o",
        out,
    )
    assert result.exit_code == 2
    assert "holds results for other settings (max_new_tokens: 6, now 7)" in result.stderr
    assert "delete that folder to start fresh" in result.stderr
    assert (out / "records.jsonl").read_bytes() == before


def test_limit_larger_than_dataset_warns_and_uses_all(tmp_path: Path, eval_pair) -> None:
    result = cli(
        "eval",
        eval_pair["target"],
        "-b",
        eval_pair["bench"],
        "--limit",
        50,
        "--max-new-tokens",
        2,
        "-o",
        tmp_path / "r",
    )
    assert result.exit_code == 0, result.output
    assert "warning: --limit 50 is more than the 12 problems" in result.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["problems"] == 12


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-b", "gsm9k"], "unknown benchmark 'gsm9k'"),
        (["-b", "{bad}"], "line 2"),
        (["-b", "{bench}", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
        (["-b", "{bench}", "--max-memory", "x"], "--max-memory 'x' is not a size"),
        (["-b", "{bench}", "--limit", "0"], "--limit"),
        (["-b", "{bench}", "--shots", "9"], "shots"),
    ],
)
def test_bad_eval_input(tmp_path: Path, eval_pair, args: list[str], message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{"question": "no answer"}\n')
    args = [a.format(bad=bad, bench=eval_pair["bench"]) for a in args]
    result = cli("eval", eval_pair["target"], *args, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_eval_patch_with_max_memory_is_refused(tmp_path: Path, eval_pair) -> None:
    # A budget this small leaves weights on disk, where the patch cannot be copied in (was a meta-tensor traceback).
    manifest = write_manifest(tmp_path / "m.json", eval_pair["source"], eval_pair["target"])
    made = cli("transplant", "-t", eval_pair["target"], "-s", eval_pair["source"], "-m", manifest, "-k", 2, "--patch",
               "-q", "-o", tmp_path / "p")  # fmt: skip
    assert made.exit_code == 0, made.output
    args = [
        "eval",
        eval_pair["target"],
        "-b",
        eval_pair["bench"],
        "--patch",
        tmp_path / "p",
        "--max-memory",
        "1KB",
    ]
    refused([*args, "-o", tmp_path / "res"], "drop --max-memory, or write the patched checkpoint", watch=tmp_path)
    assert not (tmp_path / "res").exists()


def test_eval_help_names_every_builtin_benchmark() -> None:
    text = " ".join(cli("eval", "--help").output.split())
    assert f"{', '.join(BENCHMARKS)}, or a JSONL" in text


def fake_results(
    folder: Path, correct: list[bool], benchmark: str = "arith.jsonl", ids_sha: str = "x", nll: float = 1.0
) -> Path:
    folder.mkdir(parents=True)
    (folder / "records.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "correct": c, "nll": nll + 0.1 * c}) + "\n" for i, c in enumerate(correct))
    )
    settings = {
        "benchmark": benchmark,
        "benchmark_sha256": "s",
        "problem_ids_sha256": ids_sha,
        "shots": 0,
        "chat": True,
        "max_new_tokens": 8,
    }
    n = len(correct)
    summary = {
        "benchmark": benchmark,
        "problems": n,
        "accuracy": sum(correct) / n,
        "accuracy_ci95": [0, 1],
        "nll_mean": nll + 0.1 * sum(correct) / n,
        "settings": settings,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_report_returns_a_frozen_report_whose_dict_is_its_json(tmp_path: Path) -> None:
    """`report` returns a `Report`; `report -o` writes its `to_dict`, the NLL baselines only where there is an NLL."""
    s = fake_results(tmp_path / "s", [True] * 6 + [False] * 4)
    t = fake_results(tmp_path / "t", [True] * 2 + [False] * 8)
    p = fake_results(tmp_path / "p", [True] * 4 + [False] * 6)
    result = report(s, t, [p])
    assert isinstance(result, Report) and result.rows[0].tir == pytest.approx(2.0)
    assert result.source.accuracy == 0.6 and result.rows[0].nll_source is not None
    with pytest.raises(AttributeError):
        result.rows[0].tir = 0.0  # type: ignore[misc]
    save_report(result, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(result.to_dict()))
    for folder in (s, t, p):  # the same records without a gold NLL
        records = [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines()]
        (folder / "records.jsonl").write_text("".join(json.dumps({**r, "nll": math.nan}) + "\n" for r in records))
    row = report(s, t, [p]).to_dict()["rows"][0]
    assert row["nll_undefined"] == "no gold NLL" and "nll_source" not in row and "nll_target" not in row


def test_report_math_and_undefined_cases(tmp_path: Path) -> None:
    s = fake_results(tmp_path / "s", [True] * 6 + [False] * 4)  # 60%
    t = fake_results(tmp_path / "t", [True] * 2 + [False] * 8)  # 20%
    p = fake_results(tmp_path / "p", [True] * 4 + [False] * 6)  # 40%
    result = cli("report", "-s", s, "-t", t, "-p", p, "-o", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert row["tir"] == pytest.approx(2.0) and row["recovery_pct"] == pytest.approx(50.0)
    lo, hi = row["tir_ci95"]
    assert lo <= 2.0 <= hi
    assert "| 40.0% [" in result.stdout and "| 2.00 [" in result.stdout and "| 50.0 [" in result.stdout
    # Gold NLL: S 2.0, T 3.0, P 2.25 -> 75% of the NLL gap closed (lower is better).
    s2 = fake_results(tmp_path / "s_nll", [False] * 10, nll=2.0)
    t2 = fake_results(tmp_path / "t_nll", [False] * 10, nll=3.0)
    p2 = fake_results(tmp_path / "p_nll", [False] * 10, nll=2.25)
    r2 = cli("report", "-s", s2, "-t", t2, "-p", p2, "-o", tmp_path / "r2.json")
    nll_row = json.loads((tmp_path / "r2.json").read_text())["rows"][0]
    assert nll_row["nll_recovery_pct"] == pytest.approx(75.0) and nll_row["nll"] == pytest.approx(2.25)
    assert "| 2.2500 | 75.0" in r2.stdout and "(gold NLL 2.0000)" in r2.stdout
    assert "undefined (source and target accuracies are equal (no gap))" in r2.stdout

    zero = fake_results(tmp_path / "t0", [False] * 10)
    same = fake_results(tmp_path / "s2", [True] * 2 + [False] * 8)
    r0 = cli("report", "-s", s, "-t", zero, "-p", p)
    assert "undefined (target accuracy is 0)" in r0.stdout and "inf" not in r0.stdout and "nan" not in r0.stdout
    r1 = cli("report", "-s", same, "-t", t, "-p", p)
    assert "undefined (source and target accuracies are equal (no gap))" in r1.stdout


def test_recovery_and_its_bounds_are_never_negative_zero() -> None:
    no_change = recovery(0.5, 0.5, 0.25)  # patched = target, source worse: 0 / (negative gap)
    assert no_change == 0.0 and math.copysign(1.0, no_change) == 1.0
    # The demo's case: source worse than target (negative gap), patched equal to target on most
    # resamples, so Recovery is 0 / (negative) = -0.0 there; the bound must print as "0.0".
    source = [False] * 40
    target = [True] + [False] * 39
    patched = [True, True] + [False] * 38
    lo, hi = paired_bootstrap(source, target, patched)["recovery"]
    assert hi == 0.0 and math.copysign(1.0, hi) == 1.0 and f"{100 * hi:.1f}" == "0.0"
    assert lo < 0


def test_report_refuses_mixed_results(tmp_path: Path) -> None:
    s = fake_results(tmp_path / "s", [True, False])
    t = fake_results(tmp_path / "t", [False, False], benchmark="gsm8k")
    p = fake_results(tmp_path / "p", [True, True])
    result = cli("report", "-s", s, "-t", t, "-p", p)
    assert (
        result.exit_code == 2 and "evaluated with benchmark='arith.jsonl' but the target with 'gsm8k'" in result.stderr
    )
    t2 = fake_results(tmp_path / "t2", [False, False], ids_sha="other")
    result = cli("report", "-s", s, "-t", t2, "-p", p)
    assert result.exit_code == 2 and "problem_ids_sha256" in result.stderr


def test_report_out_follows_the_overwrite_rule(tmp_path: Path) -> None:
    s, t, p = (fake_results(tmp_path / x, [True, False]) for x in "stp")
    report = ["report", "-s", s, "-t", t, "-p", p, "-o"]
    assert cli(*report, tmp_path / "r.json").exit_code == 0
    first = (tmp_path / "r.json").read_text()
    (tmp_path / "r.json").write_text("mine")
    refused([*report, tmp_path / "r.json"], f"output {tmp_path / 'r.json'} already exists", watch=tmp_path)
    assert cli(*report, tmp_path / "r.json", "--overwrite").exit_code == 0
    assert (tmp_path / "r.json").read_text() == first


def test_report_out_folder_is_refused(tmp_path: Path) -> None:
    s, t, p = (fake_results(tmp_path / x, [True, False]) for x in "stp")
    refused(
        ["report", "-s", s, "-t", t, "-p", p, "-o", tmp_path / "s", "--overwrite"],
        f"output {tmp_path / 's'} is a folder; pass a file path",
        watch=tmp_path,
    )


def test_swap_restores_bit_exactly(eval_pair) -> None:
    lm = AutoModelForCausalLM.from_pretrained(eval_pair["target"]).eval()
    src_lm = AutoModelForCausalLM.from_pretrained(eval_pair["source"])
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    with swapped(lm, open_checkpoint(eval_pair["source"]), names):
        state = lm.state_dict()
        for n in names:
            assert torch.equal(state[n], src_lm.state_dict()[n])
        assert torch.equal(state["model.norm.weight"], before["model.norm.weight"])
    after = lm.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.slow
def test_sweep_table_plot_and_no_checkpoints(tmp_path: Path, eval_pair) -> None:
    manifest = write_manifest(tmp_path / "m.json", eval_pair["source"], eval_pair["target"])
    out = tmp_path / "sweep"
    result = cli(
        "sweep",
        "-t",
        eval_pair["target"],
        "-s",
        eval_pair["source"],
        "-m",
        manifest,
        "--k",
        "2,4",
        "--max-new-tokens",
        "3",
        "-b",
        eval_pair["bench"],
        "--limit",
        4,
        "-q",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    table = json.loads((out / "sweep.json").read_text())
    assert [(r["k"], r["method"]) for r in table["rows"]] == [(2, "lae"), (2, "random"), (4, "lae"), (4, "random")]
    assert (out / "sweep.png").stat().st_size > 1000 and (out / "sweep.md").read_text().count("\n") == 8
    # The table says what it measured, on what, with which ranking; every value carries its interval.
    assert (table["benchmark"], table["problems"], table["seed"]) == (Path(eval_pair["bench"]).name, 4, 42)
    assert table["manifest"]["path"] == str(manifest) and table["target"] == str(Path(eval_pair["target"]).resolve())
    md = (out / "sweep.md").read_text()
    assert md.startswith(f"{Path(eval_pair['bench']).name}, 4 problems (seed 42") and f"from {manifest}" in md
    row = next(line for line in md.splitlines() if line.startswith("| 3 | 4 | lae |"))
    assert row.count("[") >= 1, row
    assert not list(out.rglob("*.safetensors")), "the sweep must not write checkpoints"
    # Each K's evaluation equals evaluating a checkpoint transplanted on disk.
    patched = tmp_path / "patched"
    assert (
        cli(
            "transplant",
            "-t",
            eval_pair["target"],
            "-s",
            eval_pair["source"],
            "-o",
            patched,
            "-m",
            manifest,
            "-k",
            4,
            "-q",
        ).exit_code
        == 0
    )
    save_tokenizer(patched)
    disk = evaluate(
        patched,
        str(eval_pair["bench"]),
        tmp_path / "disk",
        limit=4,
        max_new_tokens=3,
        options=ModelOptions(progress=False),
    )
    in_memory = json.loads((out / "lae-k4-m3" / "summary.json").read_text())
    assert [r["output"] for r in read_records(out / "lae-k4-m3" / "records.jsonl")] == [
        r["output"] for r in read_records(tmp_path / "disk" / "records.jsonl")
    ]
    assert in_memory["accuracy"] == disk.accuracy
    # ... and carries that checkpoint's fingerprint, so its summary can go into the checkpoint's card.
    assert (
        in_memory["settings"]["model_fingerprint"]
        == open_checkpoint(patched).fingerprint
        == (disk.settings.model_fingerprint)
    )
    # Its settings are built as eval builds them: the dtype the weights were computed in, not --dtype's `auto`.
    assert in_memory["settings"] == disk.settings.to_dict() and disk.settings.dtype == "float32"

    # A second manifest (another ranking) swept into the same folder reuses the baselines and the
    # random-K runs, which do not depend on the manifest, and adds only its own rows.
    other = write_manifest(tmp_path / "m2.json", eval_pair["source"], eval_pair["target"], reverse=True)
    obj = json.loads(other.read_text())
    obj["method"]["name"] = "lae-rel"
    other.write_text(json.dumps(obj))
    random_records = (out / "random-k2-m3" / "records.jsonl").read_bytes()
    args = [
        "-t",
        eval_pair["target"],
        "-s",
        eval_pair["source"],
        "-b",
        eval_pair["bench"],
        "--limit",
        4,
        "-q",
        "-o",
        out,
    ]
    again = cli("sweep", "-m", other, "--k", "2,4", "--max-new-tokens", "3", *args)
    assert again.exit_code == 0, again.output
    assert (out / "random-k2-m3" / "records.jsonl").read_bytes() == random_records
    assert (out / "lae-rel-k4-m3" / "summary.json").is_file()


@needs_torchrun
@pytest.mark.slow
def test_data_parallel_equals_single_process(tmp_path: Path, eval_pair) -> None:
    single = tmp_path / "single"
    run_eval(eval_pair, single, batch_size=2, keep=["general-text:2"])
    args = [
        "eval",
        str(eval_pair["target"]),
        "-b",
        str(eval_pair["bench"]),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
    ]
    done = torchrun([*args, "--keep", "general-text:2", "-q", "-o", str(tmp_path / "dp")])
    assert done.returncode == 0, done.stderr[-8000:]
    a, b = (read_records(d / "records.jsonl") for d in (single, tmp_path / "dp"))
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["output"] for r in a] == [r["output"] for r in b]
    assert [r["nll"] for r in a] == pytest.approx([r["nll"] for r in b], rel=1e-4)
    assert not list((tmp_path / "dp").glob("records.rank*.jsonl"))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (single, tmp_path / "dp"))
    assert sa["accuracy"] == sb["accuracy"] and sa["correct"] == sb["correct"]
    # The keep NLL is measured once (on rank 0), as in one process.
    ka, kb = (json.loads((d / "keep" / "general-text-2-0.json").read_text()) for d in (single, tmp_path / "dp"))
    assert ka["nll"] == pytest.approx(kb["nll"], rel=1e-5) and ka["model_fingerprint"] == kb["model_fingerprint"]


def test_the_default_k_grid_is_clipped_to_the_manifest(tmp_path: Path, eval_pair) -> None:
    """The default 8..128 on a 14-module manifest was refused; it is clipped (and the manifest's size added)."""
    manifest = write_manifest(tmp_path / "m.json", eval_pair["source"], eval_pair["target"])
    out = tmp_path / "sweep"
    result = cli("sweep", "-t", eval_pair["target"], "-s", eval_pair["source"], "-m", manifest, "--max-new-tokens", "1",
                 "-b", eval_pair["bench"], "--limit", 2, "-q", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "note: the manifest ranks 14 modules; K = [8, 14]" in result.stderr
    assert json.loads((out / "sweep.json").read_text())["k"] == [8, 14]


def test_sweep_without_the_random_baseline_evaluates_only_the_ranking(tmp_path: Path, eval_pair) -> None:
    manifest = write_manifest(tmp_path / "m.json", eval_pair["source"], eval_pair["target"])
    out = tmp_path / "sweep"
    result = cli("sweep", "-t", eval_pair["target"], "-s", eval_pair["source"], "-m", manifest, "--k", "2,4",
                 "--no-random", "--max-new-tokens", "1", "-b", eval_pair["bench"], "--limit", 2,
                 "-q", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    table = json.loads((out / "sweep.json").read_text())
    assert [(r["k"], r["method"]) for r in table["rows"]] == [(2, "lae"), (4, "lae")]
    assert table["random_seed"] is None and "no random-K baseline" in (out / "sweep.md").read_text()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["lae-k2-m1", "lae-k4-m1", "source-m1", "target-m1"]


def test_a_sweep_folder_that_recorded_the_dtype_asked_for_still_reports(tmp_path: Path, eval_pair) -> None:
    """Sweeps recorded `--dtype` (`auto`), eval the dtype used; both now record the one used (issue 26 item 4).
    A folder written the old way still reports, and a rerun into it refuses instead of mixing dtypes."""
    manifest = write_manifest(tmp_path / "m.json", eval_pair["source"], eval_pair["target"])
    out = tmp_path / "sweep"
    args = ["sweep", "-t", eval_pair["target"], "-s", eval_pair["source"], "-m", manifest, "--k", "2", "--no-random",
            "--max-new-tokens", "1", "-b", eval_pair["bench"], "--limit", 2, "-q", "-o", out]  # fmt: skip
    assert cli(*args).exit_code == 0
    for folder in ("source-m1", "target-m1", "lae-k2-m1"):
        assert json.loads((out / folder / "settings.json").read_text())["dtype"] == "float32"
        for name in ("settings.json", "summary.json"):
            obj = json.loads((out / folder / name).read_text())
            (obj.get("settings") or obj)["dtype"] = "auto"  # as a sweep before issue 26 wrote it
            (out / folder / name).write_text(json.dumps(obj))
    r = cli("report", "-s", out / "source-m1", "-t", out / "target-m1", "-p", out / "lae-k2-m1")
    assert r.exit_code == 0, r.output
    again = cli(*args)
    assert again.exit_code == 2 and "holds results for other settings (dtype: 'auto', now 'float32')" in again.output


def test_sweep_blends_at_each_alpha_and_reports_retention(tmp_path: Path, eval_pair) -> None:
    """`--alphas` evaluates each K blended as `transplant --alpha` writes it; `--keep` adds each row's Retention,
    equal to what eval --keep and report --keep give for the checkpoint written on disk."""
    manifest = write_manifest(tmp_path / "m.json", eval_pair["source"], eval_pair["target"])
    out = tmp_path / "sweep"
    result = cli("sweep", "-t", eval_pair["target"], "-s", eval_pair["source"], "-m", manifest, "--k", "4",
                 "--alphas", "0.5,1", "--keep", "general-text:3", "--no-random", "--max-new-tokens", "1",
                 "-b", eval_pair["bench"], "--limit", 2, "-q", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    table = json.loads((out / "sweep.json").read_text())
    assert table["alphas"] == [0.5, 1.0] and table["keep"] == ["general-text:3"]
    assert [(r["k"], r["alpha"]) for r in table["rows"]] == [(4, 0.5), (4, 1.0)]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "lae-k4-a0.5-m1",
        "lae-k4-m1",
        "source-m1",
        "target-m1",
    ]
    assert all(len(r["retention"]) == 1 for r in table["rows"])
    assert "| 0.5 | lae |" in (out / "sweep.md").read_text() and "keep general-text:3" in (out / "sweep.md").read_text()
    # The blended model measured in memory is the checkpoint transplant --alpha 0.5 writes: same keep NLL.
    patched = tmp_path / "patched"
    args = ("-t", eval_pair["target"], "-s", eval_pair["source"], "-m", manifest, "-k", 4, "--alpha", 0.5, "-q")
    assert cli("transplant", *args, "-o", patched).exit_code == 0
    save_tokenizer(patched)
    disk = tmp_path / "disk"
    evaluate(patched, eval_pair["bench"], disk, limit=2, max_new_tokens=1, keep=["general-text:3"],
             options=ModelOptions(progress=False))  # fmt: skip
    swept = json.loads((out / "lae-k4-a0.5-m1" / "keep" / "general-text-3-0.json").read_text())
    on_disk = json.loads((disk / "keep" / "general-text-3-0.json").read_text())
    assert swept["nll"] == on_disk["nll"] and swept["model_fingerprint"] == on_disk["model_fingerprint"]
    # Retention in the table is report --keep's on the same folders.
    rep = report(out / "source-m1", out / "target-m1", [out / "lae-k4-a0.5-m1"], keep="general-text:3")
    assert table["rows"][0]["retention"][0] == json.loads(json.dumps(rep.rows[0].retention.to_dict()))


@pytest.mark.parametrize("alphas", ["0", "0.5,1.5", "half"])
def test_sweep_refuses_bad_alphas_before_loading(tmp_path: Path, eval_pair, alphas: str) -> None:
    manifest = write_manifest(tmp_path / "m.json", eval_pair["source"], eval_pair["target"])
    refused(["sweep", "-t", eval_pair["target"], "-s", eval_pair["source"], "-m", manifest, "--k", "4",
             "--alphas", alphas, "-b", eval_pair["bench"], "-o", tmp_path / "sweep"], "--alphas",
            watch=tmp_path / "sweep")  # fmt: skip
