"""Patches: `transplant --patch`, `apply` (and `--revert`, `--link`), `apply_patch`, and their refusals."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from surgery import SurgeryError, apply, apply_patch, open_checkpoint, open_patch, transplant, verify, write_patch
from surgery.checkpoints.staging import TMP_PREFIX
from surgery.transplants.apply import AppliedPatch
from surgery.transplants.patch import PATCH_RECORD
from surgery.transplants.plan import MAX_SHARD_BYTES
from tests.helpers import cli, make_model, tree_digest
from tests.paused import spawn

MODULES = ["model.layers.1.mlp.*", "model.layers.0.self_attn.q_proj"]


@pytest.fixture
def casting_pair(tmp_path: Path) -> dict[str, Path]:
    """A sharded float32 target with a README and a bfloat16 source (so the patch casts)."""
    tgt = make_model(tmp_path / "target", 1, shard="20KB")
    (tgt / "README.md").write_text("# the target's own card\n")
    src = make_model(tmp_path / "source", 2, shard="30KB", dtype=torch.bfloat16)
    return {"target": tgt, "source": src}


def patch_of(casting_pair: dict[str, Path], out: Path, *extra: str) -> Result:
    args = [
        "transplant",
        "-t",
        casting_pair["target"],
        "-s",
        casting_pair["source"],
        "-o",
        out,
        "--patch",
        "-q",
    ]
    return cli(*args, *[a for m in MODULES for a in ("--module", m)], *extra)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_patch_then_apply_equals_a_direct_transplant_byte_for_byte(tmp_path: Path, casting_pair: dict) -> None:
    before = {k: tree_digest(v) for k, v in casting_pair.items()}
    direct = transplant(**casting_pair, out=tmp_path / "direct", modules=MODULES, progress=False)
    made = patch_of(casting_pair, tmp_path / "p")
    assert made.exit_code == 0, made.output
    assert "wrote patch" in made.output
    files = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert files == ["README.md", "patch.json", "patch.safetensors"]
    # Only the selected tensors, already cast to the target's dtype.
    held = load_file(tmp_path / "p" / "patch.safetensors")
    assert set(held) == set(direct.tensors)
    assert all(t.dtype == torch.float32 for t in held.values())

    applied = cli("apply", tmp_path / "p", "-t", casting_pair["target"], "-o", tmp_path / "applied", "-q")
    assert applied.exit_code == 0, applied.output
    # Same shards, byte for byte (headers included: the provenance is the transplant's).
    assert shard_bytes(tmp_path / "applied") == shard_bytes(tmp_path / "direct")
    record = json.loads((tmp_path / "applied" / "transplant.json").read_text())
    direct_record = json.loads((tmp_path / "direct" / "transplant.json").read_text())
    assert record["tensors"] == direct_record["tensors"]
    assert record["patch"]["path"] == str((tmp_path / "p").resolve())
    verify(tmp_path / "applied", target=casting_pair["target"], source=casting_pair["source"])
    assert {k: tree_digest(v) for k, v in casting_pair.items()} == before


def test_patch_card_names_the_target_as_base_and_says_how_to_apply(tmp_path: Path, casting_pair: dict) -> None:
    assert patch_of(casting_pair, tmp_path / "p").exit_code == 0
    card = (tmp_path / "p" / "README.md").read_text()
    assert "surgery-patch" in card and "surgery apply p --target" in card and "apply_patch(model" in card
    assert open_checkpoint(casting_pair["target"]).fingerprint in card


def test_a_target_with_other_weights_is_refused_naming_the_first_tensor(tmp_path: Path, casting_pair: dict) -> None:
    assert patch_of(casting_pair, tmp_path / "p").exit_code == 0
    other = make_model(tmp_path / "other", 7, shard="20KB")
    result = cli("apply", tmp_path / "p", "-t", other, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "tensor model.layers.0.self_attn.q_proj.weight differs from the target this patch was made for" in (
        result.stderr
    )
    assert not (tmp_path / "out").exists()


def test_a_patch_applied_twice_is_refused_with_the_reason(tmp_path: Path, casting_pair: dict) -> None:
    assert patch_of(casting_pair, tmp_path / "p").exit_code == 0
    assert cli("apply", tmp_path / "p", "-t", casting_pair["target"], "-o", tmp_path / "a", "-q").exit_code == 0
    result = cli("apply", tmp_path / "p", "-t", tmp_path / "a", "-o", tmp_path / "b", "-q")
    assert result.exit_code == 2 and "the patch is applied there already" in result.stderr
    assert not (tmp_path / "b").exists()


def test_reversible_patch_reverts_to_the_original_byte_for_byte(tmp_path: Path, casting_pair: dict) -> None:
    assert patch_of(casting_pair, tmp_path / "p", "--reversible").exit_code == 0
    assert (tmp_path / "p" / "original.safetensors").is_file()
    assert cli("apply", tmp_path / "p", "-t", casting_pair["target"], "-o", tmp_path / "a", "-q").exit_code == 0
    result = cli("apply", tmp_path / "p", "-t", tmp_path / "a", "-o", tmp_path / "back", "--revert", "-q")
    assert result.exit_code == 0, result.output
    # Every file of the original target comes back identical (shard headers, index and card included).
    assert tree_digest(tmp_path / "back") == tree_digest(casting_pair["target"])
    # --revert on the unpatched target is refused, and so is a revert with a patch that is not reversible.
    again = cli("apply", tmp_path / "p", "-t", casting_pair["target"], "-o", tmp_path / "x", "--revert", "-q")
    assert again.exit_code == 2 and "unpatched target already" in again.stderr
    assert patch_of(casting_pair, tmp_path / "plain").exit_code == 0
    plain = cli("apply", tmp_path / "plain", "-t", tmp_path / "a", "-o", tmp_path / "x", "--revert", "-q")
    assert plain.exit_code == 2 and "not reversible" in plain.stderr
    assert not (tmp_path / "x").exists()


def test_revert_with_a_tampered_original_writes_nothing(tmp_path: Path, casting_pair: dict) -> None:
    assert patch_of(casting_pair, tmp_path / "p", "--reversible").exit_code == 0
    assert cli("apply", tmp_path / "p", "-t", casting_pair["target"], "-o", tmp_path / "a", "-q").exit_code == 0
    originals = load_file(tmp_path / "p" / "original.safetensors")
    name = sorted(originals)[-1]
    originals[name] = originals[name] * 2
    save_file(originals, tmp_path / "p" / "original.safetensors", metadata={"format": "pt"})
    result = cli("apply", tmp_path / "p", "-t", tmp_path / "a", "-o", tmp_path / "back", "--revert", "-q")
    assert result.exit_code == 2, result.output
    assert f"original tensor {name} differs from its sha256" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "p", "source", "target"]


def test_apply_link_shares_inodes_only_for_untouched_shards(tmp_path: Path, casting_pair: dict) -> None:
    assert patch_of(casting_pair, tmp_path / "p", "--reversible").exit_code == 0
    out = tmp_path / "a"
    linked = cli("apply", tmp_path / "p", "-t", casting_pair["target"], "-o", out, "--link", "-q")
    assert linked.exit_code == 0, linked.output
    tgt = open_checkpoint(casting_pair["target"])
    touched = {tgt.tensors[t].shard.path.name for t in open_patch(tmp_path / "p").tensors}
    shards = sorted(p.name for p in casting_pair["target"].glob("*.safetensors"))
    assert touched and set(shards) - touched
    assert f"; {len(shards) - len(touched)} of {len(shards)} shards hard-linked to the target" in linked.stdout
    assert linked.stderr.count("editing the target in place changes this output too") == 1
    for name in shards:
        assert ((out / name).stat().st_ino == (casting_pair["target"] / name).stat().st_ino) == (name not in touched), (
            name
        )
    verify(out, target=casting_pair["target"], source=casting_pair["source"])
    # A linked revert still gives the original back exactly, linking the shards the patch left alone.
    back = tmp_path / "back"
    assert cli("apply", tmp_path / "p", "-t", out, "-o", back, "--revert", "--link", "-q").exit_code == 0
    assert tree_digest(back) == tree_digest(casting_pair["target"])
    assert {n for n in shards if (back / n).stat().st_ino == (casting_pair["target"] / n).stat().st_ino} == set(
        shards
    ) - touched


def test_apply_patch_in_memory_then_undo_is_exact(tmp_path: Path, casting_pair: dict) -> None:
    write_patch(**casting_pair, out=tmp_path / "p", modules=MODULES, progress=False)
    direct = transplant(**casting_pair, out=tmp_path / "direct", modules=MODULES, progress=False)
    model = AutoModelForCausalLM.from_pretrained(casting_pair["target"])
    original = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_patch(model, tmp_path / "p")
    applied = AutoModelForCausalLM.from_pretrained(direct.out).state_dict()
    assert all(torch.equal(v, applied[k]) for k, v in model.state_dict().items())
    with pytest.raises(SurgeryError, match="differs from the target this patch was made for"):
        apply_patch(model, tmp_path / "p")  # applied already: the sha256 check refuses it
    handle.undo()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_eval_with_patch_equals_evaluating_the_applied_checkpoint(tmp_path: Path, casting_pair: dict) -> None:
    from tests.helpers import save_tokenizer

    for m in casting_pair.values():
        save_tokenizer(m)
    write_patch(**casting_pair, out=tmp_path / "p", modules=MODULES, progress=False)
    apply(tmp_path / "p", casting_pair["target"], tmp_path / "a", progress=False)
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)]
    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--benchmark", bench, "--max-new-tokens", "4", "--dtype", "float32", "-q"]
    with_patch = cli("eval", casting_pair["target"], "--patch", tmp_path / "p", "-o", tmp_path / "r1", *common)
    assert with_patch.exit_code == 0, with_patch.output
    assert cli("eval", tmp_path / "a", "-o", tmp_path / "r2", *common).exit_code == 0
    one, two = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("r1", "r2"))
    assert one["settings"]["model_fingerprint"] == two["settings"]["model_fingerprint"]
    assert one["settings"]["model_fingerprint"] != open_checkpoint(casting_pair["target"]).fingerprint
    records = [[json.loads(x) for x in (tmp_path / r / "records.jsonl").read_text().splitlines()] for r in ("r1", "r2")]
    assert [(r["output"], r["nll"]) for r in records[0]] == [(r["output"], r["nll"]) for r in records[1]]


def test_a_kill_inside_apply_leaves_no_output(tmp_path: Path, casting_pair: dict) -> None:
    write_patch(**casting_pair, out=tmp_path / "p", modules=MODULES, progress=False)
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.touch()
    proc = spawn(["apply", str(tmp_path / "p"), "-t", str(casting_pair["target"]), "-o", str(out), "-q"], hold=hold)
    staging = tmp_path  # the temp folder is made beside OUT
    for _ in range(6000):
        if any(p.name.startswith(TMP_PREFIX) for p in staging.iterdir()) or proc.poll() is not None:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "apply ended before it was held inside the copy"
    proc.kill()
    proc.communicate()
    assert not out.exists()
    hold.unlink()
    rerun = cli("apply", tmp_path / "p", "-t", casting_pair["target"], "-o", out, "-q")
    assert rerun.exit_code == 0, rerun.output
    assert "left unfinished by an interrupted run" in rerun.stderr
    verify(out, target=casting_pair["target"], source=casting_pair["source"])


def corrupt(patch: Path, how: str) -> None:
    if how == "incomplete":
        (patch / "patch.safetensors").unlink()
    elif how == "tampered":
        tensors = load_file(patch / "patch.safetensors")
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] + 1
        save_file(tensors, patch / "patch.safetensors", metadata={"format": "pt"})
    elif how == "no record":
        (patch / PATCH_RECORD).unlink()
    elif how == "malformed record":
        record = json.loads((patch / PATCH_RECORD).read_text())
        del record["tensors"][0]["sha256"]
        (patch / PATCH_RECORD).write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("incomplete", "patch.safetensors is missing; the patch is incomplete"),
        ("tampered", "differs from its sha256 in patch.json: the patch was modified or is corrupt"),
        ("no record", "no patch.json, so not a patch"),
        ("malformed record", "malformed record"),
    ],
)
def test_a_broken_patch_is_refused_with_one_line_and_nothing_written(
    tmp_path: Path, casting_pair: dict, how: str, message: str
) -> None:
    assert patch_of(casting_pair, tmp_path / "p").exit_code == 0
    corrupt(tmp_path / "p", how)
    result = cli("apply", tmp_path / "p", "-t", casting_pair["target"], "-o", tmp_path / "out", "-q")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "source", "target"]


def test_a_wrong_target_is_named_before_the_patch_is_read(tmp_path: Path, casting_pair: dict) -> None:
    # apply checks the target before it writes a byte; the patch's tensors are hashed as they are copied.
    assert patch_of(casting_pair, tmp_path / "p").exit_code == 0
    corrupt(tmp_path / "p", "tampered")
    result = cli("apply", tmp_path / "p", "-t", casting_pair["source"], "-o", tmp_path / "out", "-q")
    assert result.exit_code == 2, result.output
    # The source: bf16 where the target is f32.
    assert "is not the model this patch is for" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    # On the right target, the tampered tensor is found during the copy, and the output is discarded.
    result = cli("apply", tmp_path / "p", "-t", casting_pair["target"], "-o", tmp_path / "out", "-q")
    assert result.exit_code == 2, result.output
    assert "the patch was modified or is corrupt" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "source", "target"]


def test_a_patch_for_another_architecture_is_refused(tmp_path: Path, casting_pair: dict) -> None:
    assert patch_of(casting_pair, tmp_path / "p").exit_code == 0
    wider = make_model(tmp_path / "wider", 1, intermediate_size=96)
    result = cli("apply", tmp_path / "p", "-t", wider, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 2 and "is not the model this patch is for" in result.stderr
    assert not (tmp_path / "out").exists()
    model = AutoModelForCausalLM.from_pretrained(wider)
    with pytest.raises(SurgeryError, match="is not the one this patch is for"):
        apply_patch(model, tmp_path / "p")


def test_patch_options_that_do_not_apply_are_refused(tmp_path: Path, casting_pair: dict) -> None:
    assert (
        "only applies with --patch"
        in cli(
            "transplant",
            "-t",
            casting_pair["target"],
            "-s",
            casting_pair["source"],
            "-o",
            tmp_path / "x",
            "--module",
            "*",
            "--reversible",
        ).stderr
    )
    assert "not to --patch" in patch_of(casting_pair, tmp_path / "y", "--link").stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_large_patches_are_sharded(tmp_path: Path, casting_pair: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("surgery.transplants.plan.MAX_SHARD_BYTES", 5000)
    assert MAX_SHARD_BYTES == 5 * 10**9
    write_patch(**casting_pair, out=tmp_path / "p", modules=MODULES, progress=False)
    files = sorted(p.name for p in (tmp_path / "p").glob("patch*.safetensors"))
    assert len(files) > 1 and files[0] == f"patch-00001-of-{len(files):05d}.safetensors"
    apply(tmp_path / "p", casting_pair["target"], tmp_path / "a", progress=False)
    verify(tmp_path / "a", target=casting_pair["target"], source=casting_pair["source"])


def test_apply_records_the_target_it_was_given_and_refuses_another_config_without_force(
    tmp_path: Path, casting_pair: dict
) -> None:
    assert patch_of(casting_pair, tmp_path / "p").exit_code == 0
    copy = shutil.copytree(casting_pair["target"], tmp_path / "copy")
    assert cli("apply", tmp_path / "p", "-t", copy, "-o", tmp_path / "a", "-q").exit_code == 0
    record = json.loads((tmp_path / "a" / "transplant.json").read_text())
    assert record["target"] == {"path": str(copy.resolve()), "fingerprint": open_checkpoint(copy).fingerprint}
    # The patch's own target moved away: the output names the copy it was made from, and verifies.
    casting_pair["target"].rename(tmp_path / "moved")
    ok = cli("verify", tmp_path / "a")
    assert ok.exit_code == 0, ok.output
    # Same tensors, one config key changed: refused, naming the key; applied with --force and a warning.
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    refused = cli("apply", tmp_path / "p", "-t", copy, "-o", tmp_path / "b", "-q")
    assert refused.exit_code == 2, refused.output
    assert "in config.json: max_position_embeddings (4096, recorded 2048); pass that target, or --force" in (
        refused.stderr
    )
    assert refused.stderr.count("\n") == 1 and not (tmp_path / "b").exists()
    forced = cli("apply", tmp_path / "p", "-t", copy, "-o", tmp_path / "b", "--force", "-q")
    assert forced.exit_code == 0, forced.output
    assert forced.stderr.startswith("warning: ") and "max_position_embeddings (4096, recorded 2048)" in forced.stderr
    for given in ([], ["-t", copy]):
        checked = cli("verify", tmp_path / "b", *given)
        assert checked.exit_code == 0, checked.output


def test_the_card_of_an_applied_patch_is_named_after_the_output(tmp_path: Path, casting_pair: dict) -> None:
    write_patch(**casting_pair, out=tmp_path / "demo.patch", modules=MODULES, progress=False)
    for folder in ("direct", "applied"):
        (tmp_path / folder).mkdir()
    transplant(**casting_pair, out=tmp_path / "direct" / "out", modules=MODULES, progress=False)
    apply(tmp_path / "demo.patch", casting_pair["target"], tmp_path / "applied" / "out", progress=False)
    card = (tmp_path / "applied" / "out" / "README.md").read_text()
    assert "# out\n" in card and 'from_pretrained("out"' in card and " -o out" in card
    assert "demo.patch" not in card
    # Title, snippet and command: exactly what a direct transplant to a folder of that name writes.
    assert card == (tmp_path / "direct" / "out" / "README.md").read_text()


def test_a_reversible_patch_missing_or_with_damaged_originals_applies_forward_but_never_reverts(
    tmp_path: Path, casting_pair: dict
) -> None:
    assert patch_of(casting_pair, tmp_path / "p", "--reversible").exit_code == 0
    assert cli("apply", tmp_path / "p", "-t", casting_pair["target"], "-o", tmp_path / "a", "-q").exit_code == 0
    damaged = shutil.copytree(tmp_path / "p", tmp_path / "damaged")
    originals = load_file(damaged / "original.safetensors")
    name = sorted(originals)[0]
    save_file({**originals, name: originals[name] * 2}, damaged / "original.safetensors", metadata={"format": "pt"})
    (tmp_path / "p" / "original.safetensors").unlink()
    fix = "rewrite it with `surgery transplant --patch --reversible`"
    for patch, why in (
        (tmp_path / "p", "original.safetensors is missing"),
        (damaged, f"original tensor {name} differs"),
    ):
        forward = cli("apply", patch, "-t", casting_pair["target"], "-o", tmp_path / f"{patch.name}-out", "-q")
        assert forward.exit_code == 0, forward.output
        assert forward.stderr.startswith("warning: ") and why in forward.stderr and fix in forward.stderr
        assert "but `apply --revert` will refuse it" in forward.stderr
        assert verify(tmp_path / f"{patch.name}-out").tensors_checked == 21
        back = cli("apply", patch, "-t", tmp_path / "a", "-o", tmp_path / "back", "--revert", "-q")
        assert back.exit_code == 2 and why in back.stderr and fix in back.stderr, back.output
        assert not (tmp_path / "back").exists()
    # inspect describes a patch folder; verify says to apply it first.
    info = cli("inspect", damaged, "--json")
    assert info.exit_code == 0, info.output
    described = json.loads(info.stdout)
    assert described["target"] == str(casting_pair["target"].resolve()) and described["reversible"] is True
    assert described["modules"] == open_patch(damaged, originals=False).modules and described["tensors"] == 4
    missing = json.loads(cli("inspect", tmp_path / "p", "--json").stdout)
    assert missing["reversible"] is False and "original.safetensors is missing" in missing["originals"]
    text = cli("inspect", tmp_path / "p")
    assert text.exit_code == 0 and "\nreversible          False\n" in text.stdout
    refused = cli("verify", tmp_path / "p")
    assert refused.exit_code == 2 and "is a patch (`surgery transplant --patch`), not a checkpoint; apply it" in (
        refused.stderr
    )


def test_apply_patch_as_a_context_manager_undoes_the_patch_on_exit(tmp_path: Path, casting_pair: dict) -> None:
    write_patch(**casting_pair, out=tmp_path / "p", modules=MODULES, progress=False)
    model = AutoModelForCausalLM.from_pretrained(casting_pair["target"])
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside the block"), apply_patch(model, tmp_path / "p") as handle:
        assert isinstance(handle, AppliedPatch)
        assert not all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
        raise RuntimeError("inside the block")
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_apply_help_says_what_target_is_under_revert() -> None:
    help_text = " ".join(cli("apply", "--help").stdout.split())
    assert "with --revert, the patched one `apply` wrote" in help_text
