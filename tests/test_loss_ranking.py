"""The loss-based ranking methods: `taylor` (first-order estimate) and `swap-nll` (measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from surgery import SurgeryError, find_candidates, load_manifest, load_stats, load_workload, open_checkpoint
from surgery.analysis.nll import encode_gold, mean_nll
from surgery.analysis.ranking import build_manifest
from surgery.checkpoints.loading import load_tokenizer
from surgery.cli import main
from tests.helpers import cli, make_model, needs_torchrun, save_tokenizer, torchrun

GOLD = [
    ("What is 2+2?", "2+2 is 4. #### 4"),
    ("Add 17 and 25.", "17+25 = 42. #### 42"),
    ("Name a prime number.", "7 is prime. #### 7"),
    ("Count to five.", "1 2 3 4 5 #### 5"),
]
CHANGED = ("model.layers.1.mlp.down_proj", "model.layers.2.self_attn.v_proj")


def _gold_file(path: Path) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "solution": s}) + "\n" for p, s in GOLD))
    return str(path)


def _nll(model_path: Path, workload: str) -> float:
    w = load_workload(workload)
    gold = encode_gold(load_tokenizer(model_path), w, True)
    return mean_nll(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64), gold)


@pytest.fixture(scope="module")
def nudged_pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A base and a copy with CHANGED perturbed a little; the one with the lower gold NLL is the source."""
    root = tmp_path_factory.mktemp("loss")
    # float64, so that the finite-difference test compares derivatives, not rounding.
    base = make_model(root / "a", 11, num_hidden_layers=4, dtype=torch.float64)
    save_tokenizer(base)
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        for name in CHANGED:
            w = lm.get_submodule(name).weight
            w.add_(torch.randn_like(w) * 0.05 * w.abs().mean())
    other = root / "b"
    lm.save_pretrained(other)
    save_tokenizer(other)
    workload = _gold_file(root / "gold.jsonl")
    a, b = _nll(base, workload), _nll(other, workload)
    source, target = (base, other) if a < b else (other, base)
    return {"source": source, "target": target, "workload": workload, "root": root}


def _rank(nudged_pair: dict, method: str, **kw):
    src, tgt = open_checkpoint(nudged_pair["source"]), open_checkpoint(nudged_pair["target"])
    return build_manifest(
        method,
        find_candidates(src, tgt),
        source=src,
        target=tgt,
        workload=load_workload(nudged_pair["workload"]),
        batch_size=2,
        **kw,
    )


@pytest.mark.parametrize("method", ["taylor", "swap-nll"])
def test_only_the_changed_modules_score(nudged_pair: dict, method: str) -> None:
    man = _rank(nudged_pair, method)
    scores = {m.name: m.score for m in man.modules}
    for name, score in scores.items():
        if name not in CHANGED:
            assert score == 0.0, (name, score)  # identical weights: exactly no change
    assert {m.name for m in man.modules[:2]} <= {*CHANGED, *(n for n, s in scores.items() if s == 0)}
    assert any(scores[n] != 0 for n in CHANGED)
    assert man.workload is not None and man.workload.max_new_tokens == 0 and man.workload.prompts == 4


def test_swap_nll_is_the_measured_drop(nudged_pair: dict, tmp_path: Path) -> None:
    # With one module differing, swapping it turns the target into the source: the score is the whole gap.
    lm = AutoModelForCausalLM.from_pretrained(nudged_pair["target"], dtype=torch.float64)
    src = AutoModelForCausalLM.from_pretrained(nudged_pair["source"], dtype=torch.float64)
    one = tmp_path / "one"
    with torch.no_grad():
        lm.get_submodule(CHANGED[0]).weight.copy_(src.get_submodule(CHANGED[0]).weight)
    lm.save_pretrained(one)
    save_tokenizer(one)
    man = _rank(nudged_pair, "swap-nll")
    expected = _nll(nudged_pair["target"], nudged_pair["workload"]) - _nll(one, nudged_pair["workload"])
    score = next(m.score for m in man.modules if m.name == CHANGED[0])
    assert score == pytest.approx(expected, rel=1e-9)


def _slope(nudged_pair: dict, name: str, workload: str) -> float:
    """d/dt of `workload`'s NLL at W_tgt + t (W_src - W_tgt) in module `name`: a central difference."""
    gold = encode_gold(load_tokenizer(nudged_pair["target"]), load_workload(workload), True)
    tgt = AutoModelForCausalLM.from_pretrained(nudged_pair["target"], dtype=torch.float64)
    src = AutoModelForCausalLM.from_pretrained(nudged_pair["source"], dtype=torch.float64)
    w_t = tgt.get_submodule(name).weight.detach().clone()
    delta = src.get_submodule(name).weight.detach() - w_t
    # transformers' RMSNorm computes in float32 even in a float64 model, so the loss carries ~1e-8 of
    # rounding: a step of 1e-2 keeps it far below the change measured (a central difference, O(eps^2)).
    eps = 1e-2

    def loss_at(step: float) -> float:
        with torch.no_grad():
            tgt.get_submodule(name).weight.copy_(w_t + step * delta)
        return mean_nll(tgt, gold)

    return (loss_at(eps) - loss_at(-eps)) / (2 * eps)


def test_taylor_equals_the_finite_difference(nudged_pair: dict) -> None:
    """-score is the directional derivative of L along W_src - W_tgt: compare with a central difference."""
    man = _rank(nudged_pair, "taylor")
    score = next(m.score for m in man.modules if m.name == CHANGED[0])
    # Agreement to 0.1-0.2% here; the float32 internals bound it, a wrong factor or sign would be off by 2x.
    assert -score == pytest.approx(_slope(nudged_pair, CHANGED[0], nudged_pair["workload"]), rel=5e-3)


def test_taylor_keep_loss_equals_the_finite_difference(nudged_pair: dict) -> None:
    """With --keep W, keep_loss is +the directional derivative of W's NLL, from its own backward pass; the task
    part is the score without --keep, to the bit."""
    keep = nudged_pair["root"] / "keep.jsonl"
    keep.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("The cat sat on the mat.", "Seven is odd.")))
    alone = {m.name: m.score for m in _rank(nudged_pair, "taylor").modules}
    traded = _rank(nudged_pair, "taylor", keep=load_workload(str(keep)))
    for m in traded.modules:
        assert m.task_gain == alone[m.name] and m.score == m.task_gain - m.keep_loss
    for name in CHANGED:
        keep_loss = next(m.keep_loss for m in traded.modules if m.name == name)
        assert keep_loss == pytest.approx(_slope(nudged_pair, name, str(keep)), rel=5e-3)


def test_candidates_from_limits_swap_nll(nudged_pair: dict, tmp_path: Path) -> None:
    prior = tmp_path / "prior.json"
    r = CliRunner().invoke(
        main,
        [
            "manifest",
            "-s",
            str(nudged_pair["source"]),
            "-t",
            str(nudged_pair["target"]),
            "--method",
            "weight-delta",
            "-o",
            str(prior),
        ],
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "swap.json"
    r = CliRunner().invoke(
        main,
        ["manifest", "-s", str(nudged_pair["source"]), "-t", str(nudged_pair["target"]), "--method", "swap-nll",
         "-w", nudged_pair["workload"], "--candidates-from", str(prior), "--max-candidates", "3", "-q", "-o", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    man = load_manifest(out)
    top3 = [m.name for m in load_manifest(prior).modules[:3]]
    assert sorted(m.name for m in man.modules) == sorted(top3)
    assert sum("outside the top 3 of prior.json (weight-delta)" in reason for _, reason in man.excluded) > 10


def test_a_workload_without_solutions_is_refused(nudged_pair: dict, tmp_path: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "hi"}) + "\n")
    for method in ("taylor", "swap-nll"):
        with pytest.raises(
            SurgeryError, match=f"method {method} needs gold solutions, and workload plain.jsonl has none"
        ):
            src, tgt = (
                open_checkpoint(nudged_pair["source"]),
                open_checkpoint(nudged_pair["target"]),
            )
            build_manifest(
                method, find_candidates(src, tgt), source=src, target=tgt, workload=load_workload(str(plain))
            )
        with pytest.raises(SurgeryError, match=f"method {method} needs --workload with gold solutions"):
            build_manifest(method, find_candidates(src, tgt), source=src, target=tgt)
    r = CliRunner().invoke(
        main,
        ["manifest", "-s", str(nudged_pair["source"]), "-t", str(nudged_pair["target"]), "--method", "taylor", "-w",
         str(plain), "-o", str(tmp_path / "m.json")],
    )  # fmt: skip
    assert r.exit_code == 2 and not (tmp_path / "m.json").exists()
    assert "needs gold solutions" in r.output


def test_builtin_train_workloads_carry_solutions() -> None:
    w = load_workload("gsm8k-train:3")
    assert w.solutions is not None and len(w.solutions) == 3
    assert all("####" in s and "<<" not in s for s in w.solutions)
    m = load_workload("math-train:2")
    assert m.solutions is not None and all(m.solutions)


@needs_torchrun
@pytest.mark.slow
def test_profile_and_taylor_under_torchrun_equal_one_process(nudged_pair: dict, tmp_path: Path) -> None:
    """2 gloo processes on the CPU: each takes half the prompts (batches); the files equal one process's."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    w = nudged_pair["workload"]
    args = [
        "profile",
        str(nudged_pair["target"]),
        "-w",
        w,
        "--max-new-tokens",
        "3",
        "--batch-size",
        "1",
        "-q",
    ]
    assert cli(*args, "-o", one).exit_code == 0
    done = torchrun([*args, "-o", str(two)])
    assert done.returncode == 0, done.stderr[-8000:]
    a, b = load_stats(one), load_stats(two)
    assert a.steps.tolist() == b.steps.tolist()
    for name in a.modules:
        assert b.mean[name] == pytest.approx(a.mean[name], rel=1e-6), name
        assert torch.allclose(b.per_prompt[name], a.per_prompt[name], rtol=1e-6), name
    t1, t2 = tmp_path / "t1.json", tmp_path / "t2.json"
    # With --keep: the keep workload's backward pass is shared out the same way, and summed with the task's.
    keep = tmp_path / "keep.jsonl"
    keep.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("The cat sat on the mat.", "Seven is odd.")))
    rank = [
        "manifest",
        "-s",
        str(nudged_pair["source"]),
        "-t",
        str(nudged_pair["target"]),
        "--method",
        "taylor",
        "-w",
        w,
        "--keep",
        str(keep),
    ]
    assert cli(*rank, "--batch-size", "1", "-q", "-o", t1).exit_code == 0
    done = torchrun([*rank, "--batch-size", "1", "-q", "-o", str(t2)])
    assert done.returncode == 0, done.stderr[-8000:]
    m1 = {m.name: m for m in load_manifest(t1).modules}
    m2 = {m.name: m for m in load_manifest(t2).modules}
    assert m1.keys() == m2.keys()
    for name, a in m1.items():
        for part in ("score", "task_gain", "keep_loss"):
            assert getattr(m2[name], part) == pytest.approx(getattr(a, part), rel=1e-6, abs=1e-15), (name, part)
