"""`analyze` -> `transplant` -> `verify` from the CLI, the stats cache, and bad analysis input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cli, make_model, refused, save_tokenizer, tree_digest

PROMPTS = ["What is 3+4?", "hello", "Tell me a number.", "Subtract 5 from 9."]


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("analyze")
    src, tgt = make_model(root / "source", 1, shard="20KB"), make_model(root / "target", 2, shard="20KB")
    for p in (src, tgt):
        save_tokenizer(p)
    w = root / "w.jsonl"
    w.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    return src, tgt, w


def test_analyze_transplant_verify_chain(tmp_path: Path, chat_pair) -> None:
    src, tgt, w = chat_pair
    before = {p: tree_digest(p) for p in (src, tgt)}
    manifest = tmp_path / "manifests" / "pair.json"
    result = cli(
        "analyze", "-s", src, "-t", tgt, "-w", w, "--max-new-tokens", 3, "--batch-size", 3, "--method", "lae",
        "-o", manifest,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {manifest}: 14 modules ranked by lae")
    obj = json.loads(manifest.read_text())
    assert obj["workload"]["prompts"] == 4 and obj["workload"]["max_new_tokens"] == 3
    assert [m["rank"] for m in obj["modules"]] == list(range(1, 15))
    scores = [m["score"] for m in obj["modules"]]
    assert scores == sorted(scores, reverse=True)
    assert all(m["score"] == pytest.approx(m["a_src"] - m["a_tgt"]) for m in obj["modules"])
    cached = sorted(p.name for p in manifest.parent.iterdir())
    assert cached == ["pair.json", "pair.source.stats.safetensors", "pair.target.stats.safetensors"]

    # Another method reuses the cached stats instead of generating again.
    again = cli(
        "analyze",
        "-s",
        src,
        "-t",
        tgt,
        "-w",
        w,
        "--max-new-tokens",
        3,
        "--method",
        "consistency",
        "-o",
        manifest,
        "--overwrite",
    )
    assert again.exit_code == 0 and again.stderr.count("reusing") == 2
    assert json.loads(manifest.read_text())["method"]["name"] == "consistency"

    out = tmp_path / "patched"
    done = cli("transplant", "-t", tgt, "-s", src, "-o", out, "-m", manifest, "-k", 4, "-q")
    assert done.exit_code == 0, done.output
    top4 = [m["name"] for m in json.loads(manifest.read_text())["modules"][:4]]
    assert json.loads((out / "transplant.json").read_text())["modules"] == top4
    ok = cli("verify", out, "-t", tgt, "-s", src)
    assert ok.exit_code == 0 and "(4 from the source" in ok.stdout
    assert before == {p: tree_digest(p) for p in (src, tgt)}


def test_profile_then_manifest_commands(tmp_path: Path, chat_pair) -> None:
    src, tgt, w = chat_pair
    for name, model in (("s", src), ("t", tgt)):
        r = cli("profile", model, "-w", w, "--max-new-tokens", 2, "-o", tmp_path / f"{name}.safetensors")
        assert r.exit_code == 0, r.output
        assert r.stdout.startswith(f"wrote {tmp_path / f'{name}.safetensors'}: 14 modules, 4 prompts, 8 decoding steps")
    r = cli(
        "manifest",
        "--source-stats",
        tmp_path / "s.safetensors",
        "--target-stats",
        tmp_path / "t.safetensors",
        "--method",
        "lae-rel",
        "-o",
        tmp_path / "m.json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["method"]["name"] == "lae-rel"
    r = cli("manifest", "-s", src, "-t", tgt, "--method", "weight-delta", "-o", tmp_path / "wd.json")
    assert r.exit_code == 0, r.output
    wd = json.loads((tmp_path / "wd.json").read_text())
    assert wd["workload"] is None and all(m["a_src"] is None and m["score"] > 0 for m in wd["modules"])


def test_transplant_with_matching_manifest_never_imports_torch(tmp_path: Path, chat_pair) -> None:
    src, tgt, _ = chat_pair
    manifest = tmp_path / "wd.json"
    assert cli("manifest", "-s", src, "-t", tgt, "--method", "weight-delta", "-o", manifest).exit_code == 0
    code = (
        "import sys, surgery;"
        f"surgery.transplant(target={str(tgt)!r}, source={str(src)!r}, out={str(tmp_path / 'out')!r},"
        f" manifest={str(manifest)!r},"
        " top_k=3, progress=False);"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "out" / "transplant.json").is_file()


@pytest.mark.parametrize(
    ("workload_text", "extra", "message"),
    [
        ("", [], "is empty"),
        ('{"prompt": 1}\n', [], "line 1: no non-empty 'prompt'"),
        ("{bad\n", [], "line 1: not valid JSON"),
        (None, ["-w", "no-such-builtin:4"], "unknown workload 'no-such-builtin:4'"),
        ('{"prompt": "a"}\n', ["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
        ('{"prompt": "a"}\n', ["--max-new-tokens", "-2"], "--max-new-tokens must be a positive integer"),
        ('{"prompt": "a"}\n', ["--max-memory", "lots"], "--max-memory 'lots' is not a size"),
    ],
)
@pytest.mark.parametrize("command", ["profile", "analyze"])
def test_bad_analysis_input(tmp_path: Path, chat_pair, command: str, workload_text, extra: list, message: str) -> None:
    src, tgt, _ = chat_pair
    w = tmp_path / "w.jsonl"
    if workload_text is not None:
        w.write_text(workload_text)
    args = ["-w", str(w), *extra] if "-w" not in extra else extra
    out = tmp_path / ("stats.safetensors" if command == "profile" else "m.json")
    cmd = ["profile", src] if command == "profile" else ["analyze", "-s", src, "-t", tgt, "--method", "lae"]
    refused([*cmd, *args, "-o", out], message, watch=tmp_path)


def test_unloadable_config_names_trust_remote_code(tmp_path: Path, chat_pair) -> None:
    _, _, w = chat_pair
    model = make_model(tmp_path / "odd", 1)
    save_tokenizer(model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "brand-new-arch"}))
    refused(["profile", model, "-w", w, "-o", tmp_path / "s.safetensors"], "--trust-remote-code", watch=tmp_path)


def test_manifest_refuses_stats_of_another_model(tmp_path: Path, chat_pair) -> None:
    src, tgt, w = chat_pair
    for name, model in (("s", src), ("t", tgt)):
        assert cli("profile", model, "-w", w, "--max-new-tokens", 1, "-o", tmp_path / f"{name}.st").exit_code == 0
    # Source stats passed for the target: the fingerprint tells them apart.
    refused(
        [
            "manifest",
            "--source-stats",
            tmp_path / "s.st",
            "--target-stats",
            tmp_path / "s.st",
            "-t",
            tgt,
            "-o",
            tmp_path / "m.json",
        ],
        "target stats were measured on",
        watch=tmp_path,
    )
    assert cli("profile", src, "-w", w, "--max-new-tokens", 2, "-o", tmp_path / "s2.st").exit_code == 0
    refused(
        [
            "manifest",
            "--source-stats",
            tmp_path / "s2.st",
            "--target-stats",
            tmp_path / "t.st",
            "-o",
            tmp_path / "m.json",
        ],
        "stats differ in settings max_new_tokens",
        watch=tmp_path,
    )
    (tmp_path / "junk.st").write_bytes(b"\x00" * 16)
    refused(
        [
            "manifest",
            "--source-stats",
            tmp_path / "junk.st",
            "--target-stats",
            tmp_path / "t.st",
            "-o",
            tmp_path / "m.json",
        ],
        "junk.st",
        watch=tmp_path,
    )
    refused(
        ["manifest", "-s", src, "-t", tgt, "--method", "random", "-o", tmp_path / "m.json"],
        "method random needs --seed",
        watch=tmp_path,
    )


def test_auto_k_refuses_an_overlapping_validation_set_before_ranking(tmp_path: Path, chat_pair) -> None:
    """The validation set shares prompts with the workload: refused before any profile, so no manifest is left
    without its K (issue 25 item 5)."""
    src, tgt, w = chat_pair
    validation = tmp_path / "val.jsonl"
    validation.write_text("".join(json.dumps({"prompt": p, "solution": "7 #### 7"}) + "\n" for p in PROMPTS[1:3]))
    refused(
        ["analyze", "-s", src, "-t", tgt, "-w", w, "--method", "lae", "--auto-k", "--validation", validation,
         "-o", tmp_path / "m.json"],
        f"the validation workload val.jsonl shares 2 prompts with the ranking workload {w.name}",
        watch=tmp_path,
    )  # fmt: skip


def test_the_python_api_chooses_k_after_ranking_with_the_same_checks(tmp_path: Path, chat_pair) -> None:
    """analyze --auto-k's flow is the library's `analyze_and_select`: it refuses before ranking too (issue 26, 6)."""
    from surgery import SurgeryError, analyze_and_select

    src, tgt, w = chat_pair
    validation = tmp_path / "val.jsonl"
    validation.write_text("".join(json.dumps({"prompt": p, "solution": "7 #### 7"}) + "\n" for p in PROMPTS[1:3]))
    before = tree_digest(tmp_path)
    with pytest.raises(SurgeryError, match="shares 2 prompts with the ranking workload"):
        analyze_and_select(str(w), str(validation), tmp_path / "m.json", source=src, target=tgt, method="lae")
    assert tree_digest(tmp_path) == before


def test_analyze_records_absolute_checkpoint_paths(tmp_path: Path, chat_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints typed relative are recorded absolute, as transplant.json records them, so that the manifest
    names them from any folder (issue 25 item 10)."""
    src, tgt, w = chat_pair
    monkeypatch.chdir(src.parent)
    r = cli("analyze", "-s", src.name, "-t", f"./{tgt.name}", "-w", w, "--method", "weight-delta",
            "-o", tmp_path / "m.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    obj = json.loads((tmp_path / "m.json").read_text())
    assert (obj["source"]["path"], obj["target"]["path"]) == (str(src.resolve()), str(tgt.resolve()))
