"""Retention on a keep set: the metric, `eval --keep` (the keep file, reused on a rerun) and `report --keep`,
end to end on tiny local models, and their refusals."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import surgery.evaluation.runner as runner
from surgery import open_checkpoint
from surgery.analysis.workloads import load_workload
from surgery.checkpoints.loading import load_tokenizer
from surgery.evaluation.keep import keep_nll
from surgery.evaluation.metrics import describe, retention
from tests.helpers import cli, model_with_tokenizer, refused, save_tokenizer

W = "general-text:4"
KEEP_FILE = "keep/general-text-4-0.json"

SOURCE = [3.0, 3.2, 2.9, 3.1, 3.3, 3.0]
TARGET = [2.0, 2.1, 2.2, 1.9, 2.0, 2.1]


def test_retention_is_100_for_the_target_0_for_the_source_and_between_for_a_mix() -> None:
    itself = retention(SOURCE, TARGET, TARGET)
    assert (itself.pct, itself.ci95, itself.undefined) == (100.0, (100.0, 100.0), None)
    advantage = (sum(SOURCE) - sum(TARGET)) / 6
    assert itself.nll_change == 0.0 and itself.advantage == pytest.approx(advantage) and itself.rows == 6
    rollback = retention(SOURCE, TARGET, SOURCE)
    assert rollback.pct == 0.0 and rollback.ci95 == (0.0, 0.0) and rollback.nll_change == pytest.approx(advantage)
    # Half the rows rolled back to the source, half kept: the share of the advantage kept, with a paired interval.
    mix = [s if i % 2 else t for i, (s, t) in enumerate(zip(SOURCE, TARGET, strict=True))]
    r = retention(SOURCE, TARGET, mix)
    expected = (
        100
        * sum(s - p for s, p in zip(SOURCE, mix, strict=True))
        / sum(s - t for s, t in zip(SOURCE, TARGET, strict=True))
    )
    assert r.pct == pytest.approx(expected) and 0 < r.pct < 100
    assert r.ci95 is not None and r.ci95[0] <= r.pct <= r.ci95[1] and r.ci95[0] < r.ci95[1]
    lo, hi = r.advantage_ci95
    assert 0 < lo <= r.advantage <= hi
    assert describe(r, "W") == f"Retention {r.pct:.1f}% [{r.ci95[0]:.1f}, {r.ci95[1]:.1f}] on W"
    # A row nothing was scored on (NaN) is left out of all three.
    assert retention([*SOURCE, math.nan], [*TARGET, 1.0], [*mix, 1.0]).pct == pytest.approx(r.pct)


@pytest.mark.parametrize(
    "target",
    [
        [2.05, 2.0, 1.95, 2.05],  # the target is worse on W on average
        [1.7, 2.3, 1.65, 2.2],  # better on average, but within noise: the interval reaches 0
    ],
)
def test_retention_is_undefined_without_a_target_advantage(target: list[float]) -> None:
    source, patched = [2.0, 2.1, 1.9, 2.0], [2.1, 2.2, 2.0, 2.1]
    r = retention(source, target, patched)
    assert r.pct is None and r.ci95 is None and r.undefined is not None
    assert r.undefined.startswith("target has no advantage: source - target")
    assert r.nll_change == pytest.approx(sum(p - t for p, t in zip(patched, target, strict=True)) / 4)
    assert r.nll_change_ci95[0] <= r.nll_change <= r.nll_change_ci95[1]
    lo, hi = r.nll_change_ci95
    assert describe(r, "W") == f"keep NLL {r.nll_change:+.3f} nats [{lo:+.3f}, {hi:+.3f}] on W ({r.undefined})"


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A target, a source that is the target with noise on every MLP weight (so the target is clearly better on
    any text), a checkpoint transplanted from them (layer 0's MLP) and the same selection as a patch; each
    evaluated (1 token on 2 problems) with --keep W and --keep a JSONL keep set, into r-<name>."""
    root = tmp_path_factory.mktemp("keep")
    target = model_with_tokenizer(root / "target", 2)
    lm = AutoModelForCausalLM.from_pretrained(target)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if ".mlp." in name:
                p.add_(torch.randn_like(p))
    lm.save_pretrained(root / "source")
    save_tokenizer(root / "source")
    select = ["-t", target, "-s", root / "source", "--module", "model.layers.0.mlp.*", "-q"]
    assert cli("transplant", *select, "-o", root / "patched").exit_code == 0
    assert cli("transplant", *select, "--patch", "-o", root / "patch").exit_code == 0
    problems = [{"question": f"{a}+1?", "answer": str(a + 1)} for a in (1, 2)]
    (root / "b.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    (root / "kw.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("one two three", "four five six")))
    folders = {"root": root}
    for name, model, extra in [
        ("source", root / "source", []),
        ("target", target, []),
        ("patched", root / "patched", []),
        ("patch", target, ["--patch", root / "patch"]),
    ]:
        folders[name] = root / f"r-{name}"
        done = cli("eval", model, *extra, "-b", root / "b.jsonl", "--max-new-tokens", 1, "--keep", W, "--keep",
                   root / "kw.jsonl", "-q", "-o", folders[name])  # fmt: skip
        assert done.exit_code == 0, done.output
    return folders


def keep_file(folder: Path) -> dict:
    return json.loads((folder / KEEP_FILE).read_text())


def test_eval_keep_writes_the_keep_file(trio) -> None:
    record, workload = keep_file(trio["target"]), load_workload(W)
    target = trio["root"] / "target"
    model = AutoModelForCausalLM.from_pretrained(target).eval()
    nll = keep_nll(model, load_tokenizer(target), workload, chat=True)
    assert (record["workload"], record["sha256"], record["rows"]) == ("general-text:4:0", workload.sha256, 4)
    assert record["nll"] == pytest.approx(nll, rel=1e-5) and record["mean"] == pytest.approx(sum(nll) / 4, rel=1e-5)
    assert record["model_fingerprint"] == open_checkpoint(target).fingerprint
    assert (record["dtype"], record["chat"]) == ("float32", False)  # plain text never goes through the template
    assert json.loads((trio["target"] / "keep" / "kw.jsonl.json").read_text())["rows"] == 2


def test_eval_keep_with_a_patch_measures_the_patched_model(trio) -> None:
    """`eval --patch P --keep W` measures the model `surgery apply` would write, and records its fingerprint."""
    patch, patched = keep_file(trio["patch"]), keep_file(trio["patched"])
    summary = json.loads((trio["patch"] / "summary.json").read_text())
    assert patch["model_fingerprint"] == summary["settings"]["model_fingerprint"] == patched["model_fingerprint"]
    assert patch["model_fingerprint"] != keep_file(trio["target"])["model_fingerprint"]
    assert patch["nll"] == pytest.approx(patched["nll"], rel=1e-6)


def test_a_rerun_reuses_the_keep_file_and_keep_added_to_a_complete_eval_only_measures_it(
    tmp_path: Path, trio, monkeypatch: pytest.MonkeyPatch
) -> None:
    generated: list[int] = []
    generate = runner.greedy_generate
    monkeypatch.setattr(runner, "greedy_generate", lambda lm, tok, prompts, *a: generated.append(len(prompts)) or
                        generate(lm, tok, prompts, *a))  # fmt: skip
    out = tmp_path / "r"
    args = ["eval", trio["root"] / "target", "-b", trio["root"] / "b.jsonl", "--max-new-tokens", 1, "-q", "-o", out]
    assert cli(*args).exit_code == 0 and generated == [2] and not (out / "keep").exists()
    records = (out / "records.jsonl").read_bytes()
    added = cli(*args, "--keep", W)
    assert added.exit_code == 0, added.output
    assert "already complete, nothing recomputed" in added.stderr and generated == [2, 0]
    assert (out / "records.jsonl").read_bytes() == records
    assert keep_file(out)["nll"] == keep_file(trio["target"])["nll"]
    assert f"keep NLL on general-text:4:0: {keep_file(out)['mean']:.4f} nats/token over 4 rows" in added.stdout
    written = (out / KEEP_FILE).stat().st_mtime_ns
    again = cli(*args, "--keep", W)
    assert again.exit_code == 0 and "keep NLL on general-text:4:0 in" in again.stderr and "reused" in again.stderr
    assert (out / KEEP_FILE).stat().st_mtime_ns == written


def run_report(trio, patched: str, *extra: object) -> tuple[str, dict]:
    out = trio["root"] / f"report-{patched}-{len(extra)}.json"
    done = cli("report", "-s", trio["source"], "-t", trio["target"], "-p", trio[patched], *extra, "-o", out)
    assert done.exit_code == 0, done.output
    result = json.loads(out.read_text())
    out.unlink()
    return done.stdout, result


def test_report_keep_gives_100_for_the_target_and_0_for_the_source(trio) -> None:
    _, itself = run_report(trio, "target", "--keep", W)
    assert itself["keep"]["workload"] == "general-text:4:0" and itself["keep"]["rows"] == 4
    assert itself["keep"]["target_nll"] < itself["keep"]["source_nll"]
    row = itself["rows"][0]
    assert row["retention"]["pct"] == 100.0 and row["retention"]["ci95"] == [100.0, 100.0]
    assert row["keep_nll"] == itself["keep"]["target_nll"]
    text, rollback = run_report(trio, "source", "--keep", W)
    assert rollback["rows"][0]["retention"]["pct"] == 0.0
    assert "| Retention 0.0% [0.0, 0.0] |" in text and "Keep set general-text:4:0 (4 rows)" in text
    # The transplanted checkpoint and the same patch applied in memory: one Retention, the model between the two.
    _, transplanted = run_report(trio, "patched", "--keep", W)
    _, patch = run_report(trio, "patch", "--keep", W)
    pct = transplanted["rows"][0]["retention"]["pct"]
    assert pct == pytest.approx(patch["rows"][0]["retention"]["pct"], abs=1e-3) and 0 < pct < 100
    # Without --keep, nothing of it.
    plain_text, plain = run_report(trio, "patched")
    assert "keep" not in plain and not {"keep_nll", "retention"} & set(plain["rows"][0])
    assert "Retention" not in plain_text and "Keep set" not in plain_text
    _, other = run_report(trio, "source", "--keep", trio["root"] / "kw.jsonl")
    assert other["keep"]["workload"] == "kw.jsonl" and other["rows"][0]["retention"]["pct"] == 0.0


def _drop(folder: Path) -> None:
    (folder / KEEP_FILE).unlink()


def _edit(**changes: object) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / KEEP_FILE
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return apply


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop, "{p} has no keep NLL on general-text:4:0; measure it with `surgery eval MODEL --keep general-text:4 "
                "-o {p}` (with that eval's other flags)"),
        (_edit(sha256="0" * 64), "{p}/keep/general-text-4-0.json was measured on other rows (4 rows, sha256 "
                                 "000000000000…) than general-text:4:0"),
        (_edit(model_fingerprint="sha256:" + "0" * 64), "{p}/keep/general-text-4-0.json measured another model "
                                                        "(fingerprint sha256:000000000000…) than the eval in {p}"),
        (_edit(dtype="bfloat16"), "the keep NLL of patched {p} was measured with dtype=bfloat16, chat=False but "
                                  "the target's with dtype=float32, chat=False"),
    ],
)  # fmt: skip
def test_report_keep_refuses_a_missing_or_foreign_keep_file(
    tmp_path: Path, trio, damage: Callable[[Path], None], message: str
) -> None:
    p = tmp_path / "r-patched"
    shutil.copytree(trio["patched"], p)
    damage(p)
    args = ["report", "-s", trio["source"], "-t", trio["target"], "-p", p, "--keep", W, "-o", tmp_path / "r.json"]
    refused(args, message.format(p=p), watch=tmp_path)


def test_keep_sets_of_other_rows_are_refused(tmp_path: Path, trio) -> None:
    """A keep set of the same name with other rows: report refuses the folders' keep files, and eval --keep into
    a folder holding one refuses too; neither writes anything."""
    changed = tmp_path / "kw.jsonl"
    changed.write_text(json.dumps({"text": "seven eight nine"}) + "\n")
    p = tmp_path / "r-target"
    shutil.copytree(trio["target"], p)
    refused(
        ["report", "-s", trio["source"], "-t", p, "-p", trio["patched"], "--keep", changed, "-o", tmp_path / "r.json"],
        f"{trio['source']}/keep/kw.jsonl.json was measured on other rows (2 rows, sha256",
        watch=tmp_path,
    )
    args = ["eval", trio["root"] / "target", "-b", trio["root"] / "b.jsonl", "--max-new-tokens", 1, "-q", "-o", p]
    refused(
        [*args, "--keep", changed],
        f"{p}/keep/kw.jsonl.json holds the keep NLL of other rows (kw.jsonl, 2 rows, sha256",
        "use a new -o, or delete that file to measure again",
        watch=tmp_path,
    )
    # A keep file of another model (the source's, copied in) is refused before anything is generated.
    shutil.copy(trio["source"] / KEEP_FILE, p / KEEP_FILE)
    refused([*args, "--keep", W], f"{p}/{KEEP_FILE} holds the keep NLL of another measurement (model_fingerprint:",
            watch=tmp_path)  # fmt: skip


def test_eval_keep_refuses_a_keep_set_without_solutions_or_two_sharing_a_file(tmp_path: Path, trio) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    args = ["eval", trio["root"] / "target", "-b", trio["root"] / "b.jsonl", "-o", tmp_path / "r"]
    refused(
        [*args, "--keep", prompts], "--keep needs gold solutions, and workload prompts.jsonl has none", watch=tmp_path
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "kw.jsonl").write_text(json.dumps({"text": "seven eight nine"}) + "\n")
    refused(
        [*args, "--keep", trio["root"] / "kw.jsonl", "--keep", tmp_path / "other" / "kw.jsonl"],
        "two --keep sets (kw.jsonl and kw.jsonl, other rows) would share the keep file keep/kw.jsonl.json",
        watch=tmp_path,
    )
