"""Keep-aware ranking (`taylor --keep W`, `swap-nll --keep W`): each module's task gain less its loss on W.

On the trade-off pair of `tests/tradeoff.py`: the target lost task A in one module (`damaged`) and gained
task B in another (`tuned`). On task A alone both are worth transplanting; traded against B, only the
damaged one is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery import SurgeryError, find_candidates, load_manifest, load_workload, open_checkpoint
from surgery.analysis.nll import encode_gold, mean_nll
from surgery.analysis.ranking import build_manifest, methods_taking_keep
from surgery.checkpoints.loading import load_tokenizer
from surgery.manifest import Manifest
from tests.helpers import cli, refused
from tests.tradeoff import PROSE, Tradeoff, build_tradeoff

LOSS_METHODS = ("taylor", "swap-nll")


@pytest.fixture(scope="module")
def tradeoff(tmp_path_factory: pytest.TempPathFactory) -> Tradeoff:
    return build_tradeoff(tmp_path_factory.mktemp("tradeoff"))


@pytest.fixture(scope="module")
def ranked(tradeoff: Tradeoff, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Manifest]:
    """Each loss method's manifest, by `surgery manifest`, on task A alone and with `--keep` task B.

    swap-nll (a pass per module) scores the top 4 of taylor's ranking on task A alone, as the README advises.
    """
    out = tmp_path_factory.mktemp("ranked")
    manifests = {}
    for method in LOSS_METHODS:
        for keep in (False, True):
            path = out / f"{method}-{keep}.json"
            extra = ["--keep", tradeoff.keep] if keep else []
            if method == "swap-nll":
                extra += ["--candidates-from", out / "taylor-False.json", "--max-candidates", 4]
            r = cli("manifest", "-s", tradeoff.source, "-t", tradeoff.target, "--method", method,
                    "-w", tradeoff.task, *extra, "-q", "-o", path)  # fmt: skip
            assert r.exit_code == 0, r.output
            manifests[method, keep] = load_manifest(path)
    return manifests


def _entry(manifest: Manifest, name: str):
    return next(m for m in manifest.modules if m.name == name)


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_on_the_task_alone_both_changed_modules_are_worth_transplanting(
    ranked: dict, tradeoff: Tradeoff, method: str
) -> None:
    man = ranked[method, False]
    assert [m.name for m in man.modules[:2]] == [tradeoff.damaged, tradeoff.tuned]
    assert _entry(man, tradeoff.tuned).score > 0  # restoring the tuned module helps task A a little
    assert {m.score for m in man.modules[2:]} == {0.0}  # the source's own modules: no change at all
    # Without --keep nothing new is recorded: the manifest reads as it always has.
    assert man.method.params == {"dtype": "auto", "chat": True}
    assert all(m.task_gain is None and m.keep_loss is None for m in man.modules)


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_traded_against_the_keep_set_only_the_damaged_module_is(ranked: dict, tradeoff: Tradeoff, method: str) -> None:
    alone, traded = ranked[method, False], ranked[method, True]
    assert traded.modules[0].name == tradeoff.damaged and traded.modules[0].score > 0
    tuned = _entry(traded, tradeoff.tuned)
    assert tuned.score < 0 and tuned.rank == len(traded.modules)  # transplanting it costs task B more than it gives
    assert tuned.keep_loss > tuned.task_gain > 0
    for m in traded.modules:
        assert m.score == m.task_gain - m.keep_loss
        # The task part is the score without --keep, to the bit: the keep workload only adds a pass.
        assert m.task_gain == _entry(alone, m.name).score
    assert traded.method.params == {
        "dtype": "auto",
        "chat": True,
        "keep": {"name": "keep.jsonl", "sha256": load_workload(tradeoff.keep).sha256},
    }
    assert traded.workload is not None and traded.workload.name == "task.jsonl"  # the task, as before


def test_swap_nll_parts_are_the_measured_changes(ranked: dict, tradeoff: Tradeoff) -> None:
    """The tuned module swapped in by hand: the task NLL's drop and the keep NLL's rise are the parts recorded."""
    tokenizer = load_tokenizer(tradeoff.target)
    task, keep = (encode_gold(tokenizer, load_workload(w), True) for w in (tradeoff.task, tradeoff.keep))
    target = AutoModelForCausalLM.from_pretrained(tradeoff.target)
    source = AutoModelForCausalLM.from_pretrained(tradeoff.source)
    before = mean_nll(target, task), mean_nll(target, keep)
    with torch.no_grad():
        target.get_submodule(tradeoff.tuned).weight.copy_(source.get_submodule(tradeoff.tuned).weight)
    after = mean_nll(target, task), mean_nll(target, keep)
    tuned = _entry(ranked["swap-nll", True], tradeoff.tuned)
    assert tuned.task_gain == pytest.approx(before[0] - after[0], rel=1e-4)
    assert tuned.keep_loss == pytest.approx(after[1] - before[1], rel=1e-4)


def test_the_summary_prints_both_parts(tradeoff: Tradeoff, tmp_path: Path) -> None:
    r = cli("manifest", "-s", tradeoff.source, "-t", tradeoff.target, "--method", "taylor",
            "-w", tradeoff.task, "--keep", tradeoff.keep, "-q", "-o", tmp_path / "m.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"{tradeoff.damaged}  (task +" in r.output and ", keep -" in r.output


def test_analyze_takes_keep(tradeoff: Tradeoff, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    r = cli("analyze", "-s", tradeoff.source, "-t", tradeoff.target, "-w", tradeoff.task, "--keep", tradeoff.keep,
            "-q", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    man = load_manifest(out)
    assert man.method.name == "taylor" and man.method.params["keep"]["name"] == "keep.jsonl"
    assert man.modules[0].name == tradeoff.damaged and _entry(man, tradeoff.tuned).score < 0


def test_analyze_auto_k_trades_and_selects_against_the_keep_set(tradeoff: Tradeoff, tmp_path: Path) -> None:
    """--auto-k --keep W: taylor ranks against W, and select measures each K's Retention on W and keeps >= R."""
    validation = tmp_path / "prose.jsonl"
    validation.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROSE))
    out = tmp_path / "m.json"
    r = cli("analyze", "-s", tradeoff.source, "-t", tradeoff.target, "-w", tradeoff.task, "--keep", tradeoff.keep,
            "--auto-k", "--validation", validation, "-k", "1,2", "--min-retention", 80, "-q", "-o", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    man = load_manifest(out)
    assert man.method.params["keep"]["name"] == "keep.jsonl" and man.selection is not None
    assert man.selection.k == 1 and [k["name"] for k in man.selection.keep] == ["keep.jsonl"]
    assert all(len(p.retention) == 1 for p in man.selection.curve)


def test_keep_is_refused_by_methods_that_cannot_use_it(tradeoff: Tradeoff, tmp_path: Path) -> None:
    assert methods_taking_keep() == ["taylor", "swap-nll"]
    message = "method weight-delta cannot use --keep; use --method taylor or swap-nll"
    pair = ["-s", tradeoff.source, "-t", tradeoff.target]
    out = ["-o", tmp_path / "m.json"]
    refused(["manifest", *pair, "--method", "weight-delta", "--keep", tradeoff.keep, *out], message, watch=tmp_path)
    # analyze refuses before it profiles anything (no stats cached beside the manifest).
    task = ["-w", tradeoff.task, "--keep", tradeoff.keep]
    refused(["analyze", *pair, *task, "--method", "lae", *out], "method lae cannot use --keep", watch=tmp_path)
    refused(
        ["analyze", *pair, "-w", tradeoff.task, "--min-retention", "80", *out],
        "--min-retention applies with --auto-k",
        watch=tmp_path,
    )
    src, tgt = open_checkpoint(tradeoff.source), open_checkpoint(tradeoff.target)
    with pytest.raises(SurgeryError, match=message):
        build_manifest(
            "weight-delta", find_candidates(src, tgt), source=src, target=tgt, keep=load_workload(tradeoff.keep)
        )


def test_a_keep_workload_without_solutions_is_refused(tradeoff: Tradeoff, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "zq jx"}) + "\n")
    message = "keep workload prompts.jsonl has no solutions to measure the NLL of; use plain text"
    for method in LOSS_METHODS:
        args = ["-s", tradeoff.source, "-t", tradeoff.target, "--method", method, "-w", tradeoff.task]
        refused(["manifest", *args, "--keep", prompts, "-o", tmp_path / "m.json"], message, watch=tmp_path)
