"""The manifest format: schema validation and the selection API."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from surgery import SurgeryError, load_manifest, save_manifest, select_modules
from surgery.checkpoints.folder import open_checkpoint
from surgery.manifest import parse_layer_range, schema
from tests.helpers import write_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def manifest_file(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> Path:
    return write_manifest(tmp_path / "m.json", *sharded_pair)


def test_published_schema_is_the_one_the_package_uses() -> None:
    published = json.loads((REPO / "manifests" / "schema.json").read_text())
    assert published == schema()
    jsonschema.Draft202012Validator.check_schema(published)


def test_example_manifests_are_valid() -> None:
    examples = sorted(p for p in (REPO / "manifests").glob("*.json") if p.name != "schema.json")
    assert examples, "manifests/ should hold at least one example"
    for path in examples:
        man = load_manifest(path)
        assert [m.rank for m in man.modules] == list(range(1, len(man.modules) + 1))
        assert {m.kind for m in man.modules} <= {"attn", "mlp", "other"}


def test_load_sorts_by_rank_and_round_trips(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    path = write_manifest(tmp_path / "m.json", *sharded_pair, reverse=True)
    man = load_manifest(path)
    assert [m.rank for m in man.modules] == list(range(1, 15))
    assert man.modules[0].name == "model.layers.1.mlp.down_proj"
    save_manifest(man, tmp_path / "again.json")
    assert load_manifest(tmp_path / "again.json") == man
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(path.read_text())


def test_the_parts_of_a_keep_traded_score_round_trip(tmp_path: Path, sharded_pair: tuple[Path, Path]) -> None:
    """`task_gain` and `keep_loss` (ranked with --keep) load and save as they are; a module without them writes
    neither key, so a manifest ranked on the task alone is what it always was."""
    path = write_manifest(tmp_path / "m.json", *sharded_pair)
    plain = json.loads(path.read_text())
    edit(path, lambda o: o["modules"][0].update(score=0.25, task_gain=0.75, keep_loss=0.5))
    man = load_manifest(path)
    assert (man.modules[0].task_gain, man.modules[0].keep_loss) == (0.75, 0.5)
    assert man.modules[1].task_gain is None and man.modules[1].keep_loss is None
    save_manifest(man, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(path.read_text())
    save_manifest(load_manifest(write_manifest(tmp_path / "plain.json", *sharded_pair)), tmp_path / "plain2.json")
    assert json.loads((tmp_path / "plain2.json").read_text()) == plain


def edit(path: Path, change) -> Path:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.update(schema_version=2), "schema_version 2 is not supported"),
        (lambda o: o.pop("schema_version"), "schema_version None is not supported"),
        (lambda o: o.pop("modules"), "invalid manifest at \\(top level\\): 'modules' is a required property"),
        (lambda o: o["modules"][3].update(kind="conv"), "invalid manifest at modules/3/kind"),
        (lambda o: o["modules"][0].update(rank=0), "invalid manifest at modules/0/rank"),
        (lambda o: o["source"].update(fingerprint="abc"), "invalid manifest at source/fingerprint"),
        (lambda o: o["method"].update(name="magic"), "invalid manifest at method/name"),
        (lambda o: o["modules"][1].update(rank=1), "ranks must be 1..14"),
        (lambda o: o["modules"][1].update(name=o["modules"][0]["name"]), "listed twice"),
        # A keep-traded score's parts come together (score = task_gain - keep_loss).
        (lambda o: o["modules"][2].update(task_gain=0.5), "invalid manifest at modules/2: 'keep_loss' is a dependency"),
        (lambda o: o["modules"][2].update(keep_loss="high", task_gain=0.5), "invalid manifest at modules/2/keep_loss"),
    ],
)
def test_invalid_manifests_are_refused(manifest_file: Path, change, message: str) -> None:
    with pytest.raises(SurgeryError, match=message):
        load_manifest(edit(manifest_file, change))


def test_unreadable_manifest(tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match="no such manifest"):
        load_manifest(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SurgeryError, match="not valid JSON"):
        load_manifest(tmp_path / "bad.json")


def test_selection(manifest_file: Path) -> None:
    modules = load_manifest(manifest_file).modules
    assert [m.name for m in select_modules(modules, top_k=2)] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]
    mlp = select_modules(modules, top_k=4, only="mlp")
    assert [m.name for m in mlp] == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
    ]
    assert {m.layer for m in select_modules(modules, layers=(1, 1))} == {1}
    picked = select_modules(modules, patterns=["*.1.mlp.*", "model.layers.0.self_attn.o_proj"])
    assert [m.name for m in picked] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "--top-k must be a positive integer, got 0"),
        ({"top_k": -3}, "--top-k must be a positive integer"),
        ({"top_k": 15}, "--top-k 15 is more than the 14 modules"),
        ({"top_k": 7, "only": "mlp"}, "--top-k 7 is more than the 6 modules"),
        ({"patterns": ["*.lm_head"]}, "matches no transplantable module"),
        ({"only": "conv"}, "unknown module kind"),
        # The filter that emptied it is named, with what the model has (it said "the selection is empty").
        ({"layers": (5, 9)}, r"^--layers 5-9 matches no layer; this model has layers 0-1$"),
    ],
)
def test_selection_errors(manifest_file: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(SurgeryError, match=message):
        select_modules(load_manifest(manifest_file).modules, **kwargs)


def test_layer_range_parsing() -> None:
    assert parse_layer_range("0-11") == (0, 11)
    assert parse_layer_range("4") == (4, 4)
    for bad in ("a-b", "5-2", "-1", "1-"):
        with pytest.raises(SurgeryError, match="layer range"):
            parse_layer_range(bad)


def test_messages_name_the_manifest_by_its_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Typed relative, named absolute: the one rule of refusals (docs/errors.md) (issue 25 item 10)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SurgeryError, match=f"^{tmp_path / 'missing.json'}: no such manifest"):
        load_manifest("missing.json")


def test_a_manifest_for_other_checkpoints_names_each_that_differs(
    tmp_path: Path, sharded_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Source, target, or both are named; an old manifest with relative paths still loads (issue 25 item 10)."""
    from surgery.manifest import ranked_elsewhere  # here, so the file's other tests import without it

    source, target = sharded_pair
    monkeypatch.chdir(source.parent)
    path = write_manifest(tmp_path / "m.json", Path(source.name), Path(target.name))
    man = load_manifest(path)
    assert (man.source.path, man.target.path) == (source.name, target.name)
    src, tgt = open_checkpoint(source), open_checkpoint(target)
    assert ranked_elsewhere(man, src, tgt) is None
    fs, ft = src.fingerprint[:19], tgt.fingerprint[:19]
    assert ranked_elsewhere(man, src, src) == f"manifest was made for target target ({ft}…), not {src.path}"
    assert ranked_elsewhere(man, tgt, src) == (
        f"manifest was made for source source ({fs}…) and target target ({ft}…), not {tgt.path} and {src.path}"
    )
    # One check with one message for every command (issue 26 item 4); --force is offered where the command has it.
    from surgery.manifest import check_ranked_for

    made = f"manifest was made for target target ({ft}…), not {src.path}; pass the checkpoints it was made for"
    with pytest.raises(SurgeryError) as e:
        check_ranked_for(man, src, src, path="m.json", forceable=False)
    assert str(e.value) == f"{Path('m.json').absolute()}: {made}"
    with pytest.raises(SurgeryError) as e:
        check_ranked_for(man, src, src)
    assert str(e.value) == f"{made}, or --force to use it anyway"
    check_ranked_for(man, src, src, force=True)  # a warning, no refusal
