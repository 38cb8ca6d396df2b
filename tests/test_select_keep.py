"""`select --keep --min-retention` (and `--alphas`): K chosen on both sides, on a pair with a known trade-off.

The trade-off pair (tests/tradeoff.py): the target lost task A in one module (`damaged`) and gained task B
in another (`tuned`). On task A both are worth restoring; restoring `tuned` throws task B away.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgery.evaluation.tradeoff import choose_point
from surgery.manifest import CurvePoint, KeepPoint, load_manifest
from tests.helpers import cli, refused
from tests.tradeoff import PROSE, Tradeoff, build_tradeoff


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tradeoff, Path, str]:
    """The pair, taylor's ranking on task A alone (both changed modules rank above every unchanged one), and a
    validation set the ranking never saw: the prose the source also learned, which the damage costs."""
    root = tmp_path_factory.mktemp("tradeoff")
    pair = build_tradeoff(root / "pair")
    manifest = root / "taylor.json"
    args = ("--method", "taylor", "-s", pair.source, "-t", pair.target, "-w", pair.task, "-q", "-o", manifest)
    assert cli("manifest", *args).exit_code == 0
    validation = root / "prose.jsonl"
    validation.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROSE))
    top = [m.name for m in load_manifest(manifest).modules[:2]]
    assert top == [pair.damaged, pair.tuned], top
    return pair, manifest, str(validation)


def _select(pair: Tradeoff, manifest: Path, validation: str, out: Path, *extra: object):
    return cli("select", "-m", manifest, "-s", pair.source, "-t", pair.target, "--validation", validation,
               "-k", "1,2,4", "--min-recovery", 90, *extra, "-q", "-o", out)  # fmt: skip


def test_keep_makes_select_take_only_the_damaged_module(ranked, tmp_path: Path) -> None:
    pair, manifest, validation = ranked
    # On the task alone, K=2 (the tuned module too) is the smallest K that recovers 90%.
    plain = _select(pair, manifest, validation, tmp_path / "plain.json")
    assert plain.exit_code == 0, plain.output
    assert load_manifest(tmp_path / "plain.json").selection.k == 2  # type: ignore[union-attr]
    # With task B to keep, K=2 keeps none of it: only the damaged module is taken, and the rule says why.
    kept = _select(pair, manifest, validation, tmp_path / "kept.json", "--keep", pair.keep, "--min-retention", 80)
    assert kept.exit_code == 0, kept.output
    sel = load_manifest(tmp_path / "kept.json").selection
    assert sel is not None and sel.k == 1 and sel.alpha == 1 and sel.min_retention == 80
    assert "while Retention stays >= 80%" in sel.rule and "was taken" in sel.rule
    assert [k["name"] for k in sel.keep] == ["keep.jsonl"] and sel.keep[0]["count"] == 6
    # Retention is measured at every K: all of task B kept with the damaged module alone, none once tuned is back.
    by_k = {p.k: p.retention[0] for p in sel.curve}
    assert by_k[1].pct is not None and by_k[1].pct > 90
    assert by_k[2].pct is not None and abs(by_k[2].pct) < 5 and by_k[2].nll_change > 0.5
    assert "Retention on keep.jsonl" in kept.output and "| 1 (chosen) |" in kept.output
    # transplant takes the chosen K from the manifest: the damaged module, and nothing else.
    out = tmp_path / "patched"
    made = cli("transplant", "-t", pair.target, "-s", pair.source, "-m", tmp_path / "kept.json", "-o", out, "-q")
    assert made.exit_code == 0, made.output
    assert json.loads((out / "transplant.json").read_text())["modules"] == [pair.damaged]


def test_alphas_choose_a_blend_that_transplant_then_writes(ranked, tmp_path: Path) -> None:
    pair, manifest, validation = ranked
    sel_path = tmp_path / "sel.json"
    args = ("--keep", pair.keep, "--min-retention", 70, "--alphas", "0.5,1", "--min-recovery", 60)
    result = cli("select", "-m", manifest, "-s", pair.source, "-t", pair.target, "--validation", validation,
                 "-k", "1,2", *args, "-q", "-o", sel_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    sel = load_manifest(sel_path).selection
    assert sel is not None
    assert sorted((p.k, p.alpha) for p in sel.curve) == [(1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0)]
    # K=1 does not recover 60% at either alpha; K=2 copied keeps nothing of task B; K=2 half-blended does both.
    point = next(p for p in sel.curve if (p.k, p.alpha) == (sel.k, sel.alpha))
    assert (sel.k, sel.alpha) == (2, 0.5), sel.rule
    assert point.recovery is not None and point.recovery >= 60 and point.retention[0].pct >= 70  # type: ignore[operator]
    assert "alpha 0.5" in result.output
    out = tmp_path / "patched"
    made = cli("transplant", "-t", pair.target, "-s", pair.source, "-m", sel_path, "-o", out)
    assert made.exit_code == 0, made.output
    assert "top-k 2, alpha 0.5 from the manifest's selection" in made.stderr
    assert json.loads((out / "transplant.json").read_text())["alpha"] == 0.5
    assert cli("verify", out, "-t", pair.target, "-s", pair.source).exit_code == 0
    # An explicit --alpha wins over the manifest's.
    copied = tmp_path / "copied"
    assert (
        cli("transplant", "-t", pair.target, "-s", pair.source, "-m", sel_path, "--alpha", 1, "-o", copied).exit_code
        == 0
    )
    assert "alpha" not in json.loads((copied / "transplant.json").read_text())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--min-retention", "80"], "--min-retention needs a keep set"),
        (["--keep", "general-text:4", "--min-retention", "150"], "--min-retention 150.0 is outside 0-100"),
        (["--alphas", "0"], "--alphas 0.0 is out of range"),
        (["--keep", "gsm8k-test:3"], "unknown workload 'gsm8k-test:3'"),
    ],
)
def test_bad_keep_options_are_refused_before_anything_runs(ranked, tmp_path: Path, extra, message: str) -> None:
    pair, manifest, validation = ranked
    refused(["select", "-m", manifest, "-s", pair.source, "-t", pair.target, "--validation", validation,
             *extra, "-o", tmp_path / "sel.json"], message, watch=tmp_path)  # fmt: skip


def _point(
    k: int, recovery: float, *kept: float | None, alpha: float = 1.0, rise: tuple[float, float] = (-0.1, 0.1)
) -> CurvePoint:
    """A curve point keeping `kept` % on each keep set (None: undefined, its keep NLL change's interval `rise`)."""
    keeps = tuple(KeepPoint(f"w{i}", r, None, sum(rise) / 2, rise) for i, r in enumerate(kept))
    return CurvePoint(k, 0.0, recovery, None, alpha, keeps)


def test_choose_point_rule() -> None:
    curve = [_point(1, 50, 99), _point(2, 95, 40), _point(4, 97, 85), _point(4, 92, 95, alpha=0.5)]
    # Both bars: the smallest K that meets them, at that K the alpha keeping the most of the target.
    chosen, rule, met = choose_point(curve, 90, 80, "nll")
    assert met and (chosen.k, chosen.alpha) == (4, 0.5) and "Retention stays >= 80%" in rule
    # No keep bar: the smallest K that recovers enough, as select always chose.
    chosen, _, met = choose_point(curve, 90, None, "nll")
    assert met and chosen.k == 2
    # Nothing meets both: the best Recovery among the points that keep enough, and the rule says so.
    chosen, rule, met = choose_point(curve, 99, 80, "nll")
    assert not met and (chosen.k, chosen.alpha) == (4, 1.0) and "the best Recovery that keeps it (97.0% at K=4)" in rule
    # Nothing keeps enough: the point that keeps the most.
    chosen, rule, met = choose_point(curve, 90, 99.5, "nll")
    assert not met and chosen.k == 1 and "no point keeps 99.5% Retention" in rule
    # A keep set where the target has no advantage (Retention undefined) passes while its keep NLL change is
    # within noise, and fails the keep bar on a rise beyond noise: the regression check.
    chosen, rule, met = choose_point([_point(1, 95, None)], 90, 80, "nll")
    assert met and chosen.k == 1 and "where it is undefined, no keep NLL rise beyond noise" in rule
    curve = [_point(1, 95, None, rise=(0.05, 0.2)), _point(2, 97, None, rise=(-0.02, 0.1))]
    chosen, _, met = choose_point(curve, 90, 80, "nll")
    assert met and chosen.k == 2
    chosen, rule, met = choose_point([curve[0], _point(2, 97, 10)], 90, 80, "nll")
    assert not met and chosen.k == 2 and "no point keeps 80% Retention" in rule
    chosen, rule, met = choose_point(curve[:1], 90, 80, "nll")
    assert not met and chosen.k == 1 and "keep NLL rose on w0" in rule
    # Without --min-retention nothing is checked on the keep side.
    assert choose_point(curve[:1], 90, None, "nll")[2]


def test_measure_patched_resumes_from_known_scores(ranked) -> None:
    """Scores already measured are not measured again, and a model none of whose scores is missing is not loaded."""
    from surgery import ModelOptions, open_checkpoint
    from surgery.analysis.workloads import load_workload
    from surgery.evaluation.tradeoff import Patched, measure_patched, nll_scorer

    pair, _, validation = ranked
    src, tgt = open_checkpoint(pair.source), open_checkpoint(pair.target)
    damaged = tuple(t for t in src.tensors if t.startswith(pair.damaged + "."))
    states = [Patched("damaged", damaged, 1.0, 1), Patched("half", damaged, 0.5, 1)]
    calls: list[str] = []
    score = nll_scorer({"v": load_workload(validation)}, chat=True)

    def counted(lm, tok):
        calls.append("x")
        return score(lm, tok)

    saved: dict = {}
    first = measure_patched(src, tgt, states, counted, ModelOptions(progress=False), on_scored=saved.__setitem__)
    assert len(calls) == 4 and saved == first and set(first) == {"source", "target", "damaged", "half"}
    # The blend is a third model, neither the target nor the copy.
    assert first["half"]["v"] not in (first["target"]["v"], first["damaged"]["v"])
    again = measure_patched(src, tgt, states, counted, ModelOptions(progress=False), known=first)
    assert again == first and len(calls) == 4
    partial = measure_patched(src, tgt, states, counted, ModelOptions(progress=False),
                              known={k: v for k, v in first.items() if k != "half"})  # fmt: skip
    assert partial == first and len(calls) == 5
