"""Blends (`transplant --alpha A`, issue 27 item 3): the selected tensors written as
`target + A * (source - target)` in float32, rounded to the target's dtype; A = 1 is today's copy, byte for
byte. The formula is checked against torch on the two inputs; the records, `verify`, the patch path and an
in-memory swap (`swapped(alpha=)`) agree with it bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery import SurgeryError, apply, open_checkpoint, open_patch, transplant, verify, write_patch
from surgery.checkpoints.candidates import find_candidates
from surgery.checkpoints.streaming import check_blendable
from surgery.checkpoints.swap import swapped
from surgery.transplants.patch import PATCH_RECORD
from surgery.transplants.records import PatchRecord, TransplantRecord
from surgery.transplants.write import output_fingerprint
from tests.helpers import cli, flip_bit, make_model, refused, tensors, tree_digest

MODULES = ["model.layers.1.mlp.*", "model.layers.0.self_attn.q_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# (target dtype, source dtype): a source of another dtype is cast as it is blended.
PAIRS = [("bf16", "bf16"), ("fp32", "fp32"), ("bf16", "fp32"), ("fp32", "bf16")]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Path]]:
    """Sharded target/source pairs of each dtype combination (the inputs are never written to)."""
    root = tmp_path_factory.mktemp("blend")
    made: dict[str, Path] = {}
    for name, dtype in DTYPES.items():
        made[f"target-{name}"] = make_model(root / f"target-{name}", 1, dtype=dtype, shard="20KB")
        made[f"source-{name}"] = make_model(root / f"source-{name}", 2, dtype=dtype, shard="30KB")
    return {(t, s): {"target": made[f"target-{t}"], "source": made[f"source-{s}"]} for t, s in PAIRS}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (torch.equal would take -0.0 for 0.0)."""
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.view(torch.uint8))
    )


def blended_by_torch(pair: dict[str, Path], names: set[str], alpha: float) -> dict[str, torch.Tensor]:
    """Every tensor the output should hold: `target + alpha * (source - target)` computed by torch in float32
    and rounded to the target's dtype for `names`, the target's own for the others."""
    tgt, src = tensors(pair["target"]), tensors(pair["source"])
    return {
        n: (t.float() + alpha * (src[n].float() - t.float())).to(t.dtype) if n in names else t for n, t in tgt.items()
    }


def selected(pair: dict[str, Path], patterns: list[str]) -> set[str]:
    """The tensors of the candidate modules matching `patterns` (the tensors a transplant takes)."""
    import fnmatch

    compat = find_candidates(open_checkpoint(pair["source"]), open_checkpoint(pair["target"]))
    return {t for c in compat.candidates if any(fnmatch.fnmatchcase(c.name, p) for p in patterns) for t in c.tensors}


@pytest.mark.parametrize("alpha", [0.5, 0.3])
@pytest.mark.parametrize("dtypes", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_a_blend_writes_the_formula_rounded_to_the_targets_dtype(
    tmp_path: Path, pairs: dict, dtypes: tuple[str, str], alpha: float
) -> None:
    pair = pairs[dtypes]
    before = {k: tree_digest(v) for k, v in pair.items()}
    out = tmp_path / "out"
    args = ["transplant", "-t", pair["target"], "-s", pair["source"], "-o", out, "--alpha", alpha, "-q"]
    made = cli(*args, *[a for m in MODULES for a in ("--module", m)])
    assert made.exit_code == 0, made.output
    assert f"from the source, blended with the target's at alpha {alpha}; " in made.stdout
    names = selected(pair, MODULES)
    want, got = blended_by_torch(pair, names, alpha), tensors(out)
    assert got.keys() == want.keys()
    for name, t in got.items():
        assert same_bits(t, want[name]), name
    # A blend is neither of its inputs.
    source = tensors(pair["source"])
    assert all(not torch.equal(got[n].float(), source[n].float()) for n in names)
    record = json.loads((out / "transplant.json").read_text())
    assert record["alpha"] == alpha and {t["name"] for t in record["tensors"]} == names
    assert {k: tree_digest(v) for k, v in pair.items()} == before, "inputs were modified"
    # The fingerprint an in-memory evaluation records (sweep) is the written output's.
    src, tgt = open_checkpoint(pair["source"]), open_checkpoint(pair["target"])
    assert output_fingerprint(tgt, src, sorted(names), alpha) == open_checkpoint(out).fingerprint
    assert output_fingerprint(tgt, src, sorted(names)) != open_checkpoint(out).fingerprint


def test_a_blend_in_many_chunks_is_the_same_blend(tmp_path: Path, pairs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer and verify read both inputs in bounded chunks: with chunks of 64 elements (a tensor here is
    up to 2048), each tensor is blended in many steps, the bf16 target's and the fp32 source's in step."""
    import surgery.checkpoints.streaming as streaming

    pair = pairs[("bf16", "fp32")]
    whole = transplant(**pair, out=tmp_path / "whole", modules=MODULES, alpha=0.3, progress=False)
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 256)
    steps = transplant(**pair, out=tmp_path / "steps", modules=MODULES, alpha=0.3, progress=False)
    assert steps.tensors == whole.tensors
    assert verify(steps.out).alpha == 0.3


def test_alpha_1_is_todays_transplant_byte_for_byte(tmp_path: Path, pairs: dict) -> None:
    pair = pairs[("bf16", "fp32")]
    common = [a for m in MODULES for a in ("--module", m)]
    plain = cli("transplant", "-t", pair["target"], "-s", pair["source"], "-o", tmp_path / "plain" / "out", *common)
    one = cli(
        "transplant", "-t", pair["target"], "-s", pair["source"], "-o", tmp_path / "one" / "out", *common, "--alpha", 1
    )
    assert plain.exit_code == one.exit_code == 0, one.output
    # Every file, transplant.json and the card included (same output name, other folders).
    assert tree_digest(tmp_path / "plain" / "out") == tree_digest(tmp_path / "one" / "out")
    assert plain.stdout.replace("plain", "one") == one.stdout
    assert "alpha" not in (tmp_path / "one" / "out" / "transplant.json").read_text()
    # The Python API and the patch path alike.
    api = transplant(**pair, out=tmp_path / "api" / "out", modules=MODULES, alpha=1, progress=False)
    assert tree_digest(api.out) == tree_digest(tmp_path / "plain" / "out") and api.alpha == 1
    patches = [
        write_patch(**pair, out=tmp_path / name / "p", modules=MODULES, progress=False, **kw)
        for name, kw in (("p-plain", {}), ("p-one", {"alpha": 1.0}))
    ]
    assert tree_digest(patches[0].out) == tree_digest(patches[1].out)


def test_verify_recomputes_the_blend_and_names_an_edited_tensor(tmp_path: Path, pairs: dict) -> None:
    pair = pairs[("bf16", "fp32")]
    out = tmp_path / "out"
    transplant(**pair, out=out, modules=MODULES, alpha=0.5, progress=False)
    ok = cli("verify", out)
    assert ok.exit_code == 0, ok.output
    n = len(selected(pair, MODULES))
    assert f"({n} from the source, blended with the target's at alpha 0.5), and" in ok.stdout
    report = verify(out, **pair)
    assert report.alpha == 0.5 and report.from_source == n

    # One bit of a blended tensor flipped: exit 1, naming it and the formula.
    name = "model.layers.1.mlp.up_proj.weight"
    flip_bit(out, name)
    bad = cli("verify", out)
    assert bad.exit_code == 1
    assert bad.stderr.startswith(
        f"verify failed: tensor {name!r}: byte 3 differs from target + 0.5 * (source - target) of the target "
        f"{pair['target']} and the source {pair['source']}; "
    ), bad.stderr


def test_verify_checks_the_recorded_alpha(tmp_path: Path, pairs: dict) -> None:
    """A blend recorded as a copy (or at another alpha) is found: verify checks the formula the record names."""
    pair = pairs[("fp32", "fp32")]
    out = tmp_path / "out"
    transplant(**pair, out=out, modules=MODULES, alpha=0.5, progress=False)
    record = json.loads((out / "transplant.json").read_text())
    for alpha in (None, 0.25):
        if alpha is None:
            del record["alpha"]
        else:
            record["alpha"] = alpha
        (out / "transplant.json").write_text(json.dumps(record))
        bad = cli("verify", out)
        assert bad.exit_code == 1 and "model.layers.0.self_attn.q_proj.weight': byte 0 differs from " in bad.stderr


def test_records_round_trip_alpha_and_older_records_load_as_a_copy(tmp_path: Path, pairs: dict) -> None:
    pair = pairs[("bf16", "bf16")]
    transplant(**pair, out=tmp_path / "out", modules=MODULES, alpha=0.25, progress=False)
    write_patch(**pair, out=tmp_path / "p", modules=MODULES, alpha=0.25, reversible=True, progress=False)
    apply(tmp_path / "p", pair["target"], tmp_path / "applied", progress=False)
    for file, cls in (
        (tmp_path / "out" / "transplant.json", TransplantRecord),
        (tmp_path / "applied" / "transplant.json", TransplantRecord),
        (tmp_path / "p" / PATCH_RECORD, PatchRecord),
    ):
        text = file.read_text()
        record = cls.from_dict(json.loads(text))
        assert record.alpha == 0.25, file
        assert json.dumps(record.to_dict(), indent=2) + "\n" == text, file  # key for key
        assert cls.from_dict(record.to_dict()) == record
        older = json.loads(text)
        del older["alpha"]
        assert cls.from_dict(older).alpha == 1.0 and "alpha" not in cls.from_dict(older).to_dict()
        for broken in (0, 1.5, "0.5", True, None):
            with pytest.raises(
                SurgeryError, match=r"malformed record \(TypeError\('alpha'\) missing or mistyped\)"
            ) as e:
                cls.from_dict({**json.loads(text), "alpha": broken}, file)
            assert "\n" not in str(e.value)
    assert open_patch(tmp_path / "p").record.alpha == 0.25


@pytest.mark.parametrize("alpha", ["0", "-0.5", "1.5", "nan", "inf"])
@pytest.mark.parametrize("mode", [[], ["--patch"], ["--dry-run"], ["--link"]], ids=["", "patch", "dry-run", "link"])
def test_alpha_out_of_range_is_refused_and_nothing_written(
    tmp_path: Path, pairs: dict, alpha: str, mode: list[str]
) -> None:
    pair = pairs[("bf16", "bf16")]
    args = ["transplant", "-t", pair["target"], "-s", pair["source"], "-o", tmp_path / "out", "--module", "*"]
    refused(
        [*args, "--alpha", alpha, *mode], f"--alpha {float(alpha)!r} is out of range; pass 0 < A <= 1", watch=tmp_path
    )
    assert not (tmp_path / "out").exists()


def test_the_api_refuses_alpha_out_of_range_and_a_blend_of_integer_tensors(tmp_path: Path, pairs: dict) -> None:
    pair = pairs[("fp32", "fp32")]
    for alpha in (0, 1.0001, -1, math.nan):
        with pytest.raises(SurgeryError, match="is out of range; pass 0 < A <= 1"):
            transplant(**pair, out=tmp_path / "out", modules=MODULES, alpha=alpha, progress=False)
        with pytest.raises(SurgeryError, match="is out of range; pass 0 < A <= 1"):
            write_patch(**pair, out=tmp_path / "p", modules=MODULES, alpha=alpha, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SurgeryError, match=r"^tensor w: I8 in the source, I8 in the target: only float tensors blend"):
        check_blendable("I8", "I8", "tensor w")
    check_blendable("BF16", "F32", "tensor w")


@pytest.mark.parametrize("dtypes", [("bf16", "fp32"), ("fp32", "fp32")], ids=["bf16-fp32", "fp32-fp32"])
def test_module_star_with_alpha_blends_every_candidate(tmp_path: Path, pairs: dict, dtypes: tuple[str, str]) -> None:
    """`--module '*' --alpha A`: every transplantable module interpolated, the WiSE-FT baseline."""
    pair = pairs[dtypes]
    out = tmp_path / "out"
    made = cli("transplant", "-t", pair["target"], "-s", pair["source"], "-o", out, "--module", "*", "--alpha", 0.5)
    assert made.exit_code == 0, made.output
    compat = find_candidates(open_checkpoint(pair["source"]), open_checkpoint(pair["target"]))
    names = {t for c in compat.candidates for t in c.tensors}
    record = json.loads((out / "transplant.json").read_text())
    assert record["modules"] == [c.name for c in compat.candidates]
    assert {t["name"] for t in record["tensors"]} == names
    want, got = blended_by_torch(pair, names, 0.5), tensors(out)
    assert all(same_bits(got[n], want[n]) for n in want)
    card = (out / "README.md").read_text()
    assert "their weights were blended at alpha 0.5 (target + 0.5 * (source - target)" in card
    assert "--module '*' --alpha 0.5\n" in card
    assert cli("verify", out).exit_code == 0


def test_dry_run_shows_the_blend_and_writes_nothing(tmp_path: Path, pairs: dict) -> None:
    pair = pairs[("bf16", "fp32")]
    n = len(selected(pair, MODULES))
    for extra in ([], ["--patch"]):
        args = ["transplant", "-t", pair["target"], "-s", pair["source"], "-o", tmp_path / "out", "--dry-run"]
        planned = cli(*args, *[a for m in MODULES for a in ("--module", m)], "--alpha", "0.5", *extra)
        assert planned.exit_code == 0, planned.output
        last = planned.stdout.splitlines()[-1]
        assert (
            f": {n} tensors (" in last
            and f"{n} cast, {n} blended with the target at alpha 0.5) from the source" in last
        )
    assert list(tmp_path.iterdir()) == []


def test_a_blended_patch_applies_to_the_blended_transplant_and_reverts(tmp_path: Path, pairs: dict) -> None:
    pair = pairs[("bf16", "fp32")]
    direct = transplant(**pair, out=tmp_path / "direct", modules=MODULES, alpha=0.5, progress=False)
    made = cli(
        "transplant", "-t", pair["target"], "-s", pair["source"], "-o", tmp_path / "p", "--patch", "--reversible",
        "--alpha", "0.5", "-q", *[a for m in MODULES for a in ("--module", m)],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert made.stdout.endswith("from the source, blended with the target's at alpha 0.5\n")
    patch = open_patch(tmp_path / "p")
    assert patch.record.alpha == 0.5
    assert "blended with the target's at alpha 0.5" in (tmp_path / "p" / "README.md").read_text()
    # The patch holds the blended bytes, with their sha256 as the direct transplant wrote them.
    assert {n: t.sha256 for n, t in patch.tensors.items()} == direct.tensors
    applied = cli("apply", tmp_path / "p", "-t", pair["target"], "-o", tmp_path / "applied", "-q")
    assert applied.exit_code == 0, applied.output
    assert "blended with the target's at alpha 0.5" in applied.stdout
    for name in [p.name for p in pair["target"].glob("*.safetensors")]:
        assert (tmp_path / "applied" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    record = json.loads((tmp_path / "applied" / "transplant.json").read_text())
    assert record["alpha"] == 0.5
    assert record["tensors"] == json.loads((tmp_path / "direct" / "transplant.json").read_text())["tensors"]
    assert verify(tmp_path / "applied").alpha == 0.5
    back = cli("apply", tmp_path / "p", "-t", tmp_path / "applied", "-o", tmp_path / "back", "--revert", "-q")
    assert back.exit_code == 0, back.output
    assert tree_digest(tmp_path / "back") == tree_digest(pair["target"])


@pytest.mark.parametrize("dtypes", [("bf16", "fp32"), ("fp32", "bf16")], ids=["bf16-fp32", "fp32-bf16"])
def test_swapped_alpha_equals_the_written_blend_and_restores_exactly(
    tmp_path: Path, pairs: dict, dtypes: tuple[str, str]
) -> None:
    pair = pairs[dtypes]
    names = sorted(selected(pair, MODULES))
    transplant(**pair, out=tmp_path / "out", modules=MODULES, alpha=0.3, progress=False)
    written = tensors(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(pair["target"], dtype=DTYPES[dtypes[0]])
    original = {k: v.clone() for k, v in model.state_dict().items()}
    src = open_checkpoint(pair["source"])
    with swapped(model, src, names, alpha=0.3):
        state = model.state_dict()
        assert all(same_bits(state[n], written[n]) for n in names)
        assert all(same_bits(state[k], v) for k, v in original.items() if k not in names)
    assert all(same_bits(v, original[k]) for k, v in model.state_dict().items())
    # An error inside the block restores too; alpha 1 is the plain swap (the source cast to the param's dtype).
    source = tensors(pair["source"])
    with pytest.raises(RuntimeError, match="inside"), swapped(model, src, names, alpha=1):
        assert all(same_bits(model.state_dict()[n], source[n].to(DTYPES[dtypes[0]])) for n in names)
        raise RuntimeError("inside")
    assert all(same_bits(v, original[k]) for k, v in model.state_dict().items())
    with pytest.raises(SurgeryError, match="is out of range"), swapped(model, src, names, alpha=0):
        pass
    assert all(same_bits(v, original[k]) for k, v in model.state_dict().items())
