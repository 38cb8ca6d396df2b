"""The ranking registry: every registered method, run from one table on a planted pair."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from surgery import SurgeryError, find_candidates, load_workload, open_checkpoint
from surgery.analysis.ranking import (
    METHODS,
    RANKING_METHODS,
    baseline_method,
    build_manifest,
    check_needs,
    get_method,
    methods_taking_keep,
    methods_that_need,
    ranking_method,
)
from surgery.analysis.ranking.schema import PACKAGED, generated_schema, schema_text
from surgery.manifest import schema

ALL = list(RANKING_METHODS)
GENERATOR = "python -m surgery.analysis.ranking.schema"
# What each method's manifest records as `method.params`: the keys manifests have always had.
RECORDED = {"stats": {"settings"}, "seed": {"seed"}, "gold": {"dtype", "chat"}}


def test_registry_names_equal_the_schema_enum() -> None:
    # A method the schema does not admit would write manifests that `load_manifest` refuses.
    assert list(METHODS) == schema()["properties"]["method"]["properties"]["name"]["enum"]
    committed = json.loads((Path(__file__).parents[1] / "manifests" / "schema.json").read_text())
    assert committed == schema()


def test_the_schema_file_is_what_the_generator_writes() -> None:
    # One schema, generated: a new method's name gets in by `python -m surgery.analysis.ranking.schema`.
    assert generated_schema()["properties"]["method"]["properties"]["name"]["enum"] == list(RANKING_METHODS)
    assert PACKAGED.read_text(encoding="utf-8") == schema_text(), f"{PACKAGED} is stale; run {GENERATOR}"
    assert json.loads(schema_text()) == generated_schema()
    published = Path(__file__).parents[1] / "manifests" / "schema.json"
    assert published.resolve() == PACKAGED.resolve(), "manifests/schema.json is a link to the packaged schema"


def test_sweeps_baseline_and_the_seed_methods_come_from_what_methods_declare() -> None:
    assert baseline_method().name == "random" and "seed" in baseline_method().needs
    assert methods_that_need("seed") == ["random", "random-changed"]
    assert methods_that_need("stats")[0] == "lae"
    with pytest.raises(ValueError, match="second baseline"):
        ranking_method("another-random", baseline=True)(lambda ctx: {})
    assert "another-random" not in RANKING_METHODS


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(SurgeryError, match=r"unknown method 'nope'; use one of lae, lae-abs, .*random"):
        get_method("nope")


def test_a_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        ranking_method("lae")(lambda ctx: {})


def _rank(method: str, source: Path, target: Path, src_stats, tgt_stats, seed: int | None = 1, gold: bool = True):
    src, tgt = open_checkpoint(source), open_checkpoint(target)
    spec = get_method(method)
    extra: dict = {"src_stats": src_stats, "tgt_stats": tgt_stats} if "stats" in spec.needs else {}
    if "gold" in spec.needs and gold:
        path = target.parent / "gold.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "solution": f"{p} 42"}) + "\n" for p in ("1+1?", "Hi")))
        extra["workload"] = load_workload(str(path))
    return build_manifest(method, find_candidates(src, tgt), source=src, target=tgt, seed=seed, **extra)


@pytest.mark.parametrize("method", ALL)
def test_every_method_scores_finitely_and_deterministically(planted, method: str) -> None:
    target, tgt_stats, make_source = planted
    source, src_stats = make_source("model.layers.2.mlp.up_proj")
    first = _rank(method, source, target, src_stats, tgt_stats)
    again = _rank(method, source, target, src_stats, tgt_stats)
    assert first.to_dict() == again.to_dict()
    assert all(math.isfinite(m.score) for m in first.modules)
    assert [m.rank for m in first.modules] == list(range(1, len(first.modules) + 1))
    assert first.method.name == method
    assert set(first.method.params) == set().union(*(RECORDED[n] for n in RANKING_METHODS[method].needs))
    if "seed" in RANKING_METHODS[method].needs:
        assert first.method.params == {"seed": 1}
    if "stats" in RANKING_METHODS[method].needs:
        assert first.method.params["settings"] == asdict(src_stats.meta.settings)
    if "gold" in RANKING_METHODS[method].needs:
        assert first.method.params == {"dtype": "auto", "chat": True}
    # Equal scores keep module order (candidate order), so the ranking never depends on a hash.
    order = [c.name for c in find_candidates(open_checkpoint(source), open_checkpoint(target)).candidates]
    for a, b in zip(first.modules, first.modules[1:], strict=False):
        if a.score == b.score:
            assert order.index(a.name) < order.index(b.name)


@pytest.mark.parametrize("method", [m for m in ALL if RANKING_METHODS[m].needs])
def test_a_missing_need_gets_the_registry_message(planted, method: str) -> None:
    target, _, make_source = planted
    source, _ = make_source("model.layers.2.mlp.up_proj")
    need = sorted(RANKING_METHODS[method].needs)[0]
    hint = {"stats": "--source-stats and --target-stats", "seed": "--seed", "gold": "--workload with gold"}[need]
    with pytest.raises(SurgeryError, match=f"method {method} needs {re.escape(hint)}"):
        _rank(method, source, target, None, None, seed=None, gold=False)


@pytest.mark.parametrize("method", ALL)
def test_keep_is_taken_only_by_the_methods_that_declare_it(method: str) -> None:
    """One check, one message for every method: --keep names the methods that can trade against it."""
    spec = get_method(method)
    assert methods_taking_keep() == ["taylor", "swap-nll"]
    if spec.takes_keep:
        check_needs(spec, have_stats=True, seed=1, have_gold=True, have_keep=True)
        return
    # Refused before any missing need: stats or a seed would not make --keep usable.
    with pytest.raises(SurgeryError, match=f"^method {method} cannot use --keep; use --method taylor or swap-nll,"):
        check_needs(spec, have_stats=False, seed=None, have_gold=False, have_keep=True)


@pytest.mark.parametrize("method", ["lae", "lae-abs", "lae-rel", "weight-delta", "swap-nll", "random-changed"])
def test_the_planted_module_ranks_first(planted, method: str) -> None:
    target, tgt_stats, make_source = planted
    # The last layer's down_proj: no module downstream of it changes, so activations isolate it too.
    name = "model.layers.3.mlp.down_proj"
    source, src_stats = make_source(name)
    assert _rank(method, source, target, src_stats, tgt_stats).modules[0].name == name


def test_random_changed_draws_only_among_the_modules_that_differ(planted) -> None:
    target, tgt_stats, make_source = planted
    source, src_stats = make_source("model.layers.2.mlp.up_proj")
    man = _rank("random-changed", source, target, src_stats, tgt_stats, seed=3)
    assert man.modules[0].name == "model.layers.2.mlp.up_proj" and 0 <= man.modules[0].score < 1
    assert all(m.score == -1.0 for m in man.modules[1:])
    # Against itself nothing differs: a pure ranking by module order.
    same = _rank("random-changed", target, target, tgt_stats, tgt_stats, seed=3)
    assert {m.score for m in same.modules} == {-1.0}
