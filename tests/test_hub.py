"""The model card `transplant` writes, and `surgery push` against a test double of HfApi (nothing is sent)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from unittest.mock import create_autospec

import httpx2
import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import CommitInfo, RepoUrl

import surgery.hub.publish
from surgery import SurgeryError, open_checkpoint, transplant, write_patch
from surgery.evaluation.metrics import wilson_interval
from surgery.hub.publish import push
from tests.helpers import cli, tree_digest, write_manifest
from tests.hub_cache import add_snapshot, commit_hash, offline_hub

FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdef"
REPO_URL = "https://huggingface.co/org/patched"
OUTPUT_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "model.safetensors.index.json",
    "transplant.json",
}


@pytest.fixture
def hub(tmp_path: Path, sharded_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> dict:
    """org/source and org/target in an offline HF cache, a manifest for them, and a fake HF_TOKEN."""
    src, tgt = sharded_pair
    cache = tmp_path / "hf-cache"
    add_snapshot(cache, "org/source", src, commit_hash("s"))
    add_snapshot(cache, "org/target", tgt, commit_hash("t"), refs=("main", "v1"))
    offline_hub(monkeypatch, cache)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    return {"source": src, "target": tgt, "manifest": write_manifest(tmp_path / "m.json", src, tgt, reverse=True)}


def eval_summary(
    path: Path, benchmark: str = "gsm8k", correct: int = 20, problems: int = 50, fingerprint: str = "sha256:" + "0" * 64
) -> Path:
    """A summary.json with the fields `surgery eval` writes, of the model with `fingerprint`."""
    summary = {
        "model": "/somewhere/llama-chat-patched",
        "benchmark": benchmark,
        "grader": "gsm8k",
        "problems": problems,
        "correct": correct,
        "accuracy": correct / problems,
        "accuracy_ci95": list(wilson_interval(correct, problems)),
        "nll_mean": 1.25,
        "mean_tokens": 88.0,
        "prompt_format": "chat",
        "settings": {
            "benchmark": benchmark,
            "limit": problems,
            "seed": 42,
            "shots": 0,
            "max_new_tokens": 256,
            "model_fingerprint": fingerprint,
        },
        "versions": {"surgery": "0.1.0"},
    }
    path.write_text(json.dumps(summary))
    return path


def test_card_of_a_transplant_from_repo_ids(hub: dict, tmp_path: Path) -> None:
    out = tmp_path / "patched"
    args = ["transplant", "-t", "org/target@v1", "-s", "org/source", "-o", out, "-m", hub["manifest"], "-k", 4, "-q"]
    # Scores attach only to the model they measured: the fingerprint of this output, known once written once.
    assert cli(*args).exit_code == 0
    fingerprint = open_checkpoint(out).fingerprint
    gsm8k = eval_summary(tmp_path / "gsm8k.json", fingerprint=fingerprint)
    mine = eval_summary(tmp_path / "mine.json", benchmark="mine.jsonl", correct=3, problems=10, fingerprint=fingerprint)
    result = cli(*args, "--eval-results", gsm8k, "--eval-results", mine, "--overwrite")
    assert result.exit_code == 0, result.output

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/target", "org/source"]
    assert card.data.tags == ["model-transplant", "surgery"]
    assert card.data.library_name == "transformers"
    # Evaluation results as model-index metadata, parsed back into EvalResults.
    assert card.data.model_name == "patched"
    results = {r.dataset_type: r for r in card.data.eval_results}
    assert results.keys() == {"openai/gsm8k", "mine.jsonl"}
    assert (results["openai/gsm8k"].metric_type, results["openai/gsm8k"].metric_value) == ("accuracy", 0.4)
    assert results["openai/gsm8k"].dataset_split == "test" and results["mine.jsonl"].metric_value == 0.3

    # The body: every transplanted module with its kind, layer, score and rank, in selection order.
    record = json.loads((out / "transplant.json").read_text())
    manifest = {m["name"]: m for m in json.loads(hub["manifest"].read_text())["modules"]}
    rows = [line for line in card.text.splitlines() if line.startswith("| `model.")]
    assert len(rows) == len(record["modules"]) == 4
    for row, name in zip(rows, record["modules"], strict=True):
        m = manifest[name]
        assert row == f"| `{name}` | {m['kind']} | {m['layer']} | {m['score']:.6g} | {m['rank']} |"
    assert "- manifest: method `lae`, workload `test` (4 prompts, 8 new tokens)" in card.text
    assert "- top-k: 4" in card.text
    lo, hi = wilson_interval(20, 50)
    assert f"| gsm8k | 50 | 40.0% (20/50) | [{100 * lo:.1f}, {100 * hi:.1f}] | 0 | 256 |" in card.text
    assert f"| target | `org/target` | v1 → `{commit_hash('t')}` |" in card.text
    command = f"surgery transplant -t org/target@{commit_hash('t')} -s org/source@{commit_hash('s')} -o patched"
    assert f"{command} -m m.json -k 4" in card.text
    assert FAKE_TOKEN not in (out / "README.md").read_text()

    # The generated card is not a file verify expects to equal the target's.
    ok = cli("verify", out, "-t", "org/target@v1", "-s", "org/source")
    assert ok.exit_code == 0, ok.output


def test_card_of_local_folders_names_them_without_paths(hub: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    transplant(target=hub["target"], source=hub["source"], out=out, modules=["*.0.mlp.down_proj"], progress=False)
    card = ModelCard.load(out / "README.md")
    # Local folders have no Hub id: base_model is left out rather than filled with something the Hub rejects.
    assert card.data.base_model is None and card.data.eval_results is None
    assert card.data.tags == ["model-transplant", "surgery"] and card.data.library_name == "transformers"
    assert "`target` (local folder) with 1 module transplanted from `source` (local folder)" in card.text
    assert "| `model.layers.0.mlp.down_proj` | mlp | 0 |" in card.text and "| rank |" not in card.text
    assert "- module patterns: `*.0.mlp.down_proj`" in card.text
    # How to load it and the command that makes it again, with local inputs by folder name only.
    assert 'AutoModelForCausalLM.from_pretrained("out", dtype="auto")' in card.text
    assert "surgery transplant -t target -s source -o out --module '*.0.mlp.down_proj'" in card.text
    assert open_checkpoint(hub["target"]).fingerprint in card.text
    assert str(hub["target"].parent) not in (out / "README.md").read_text(), "a local path leaked into the card"


def test_target_readme_is_replaced_by_the_card(hub: dict, tmp_path: Path) -> None:
    tgt = tmp_path / "target-with-card"
    shutil.copytree(hub["target"], tgt)
    (tgt / "README.md").write_text("---\nlicense: mit\n---\n# The target's own card\n")
    out = tmp_path / "out"
    transplant(target=tgt, source=hub["source"], out=out, modules=["*.0.mlp.up_proj"], progress=False)
    assert "The target's own card" not in (out / "README.md").read_text()
    assert ModelCard.load(out / "README.md").data.tags == ["model-transplant", "surgery"]
    ok = cli("verify", out, "-t", tgt, "-s", hub["source"])
    assert ok.exit_code == 0 and ok.stdout.endswith("and 3 files match\n"), ok.output


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "absent.json", "absent.json: no such eval summary"),
        (lambda d: d, "is a folder; pass the summary.json written by `surgery eval`"),
        (lambda d: _write(d / "x.json", "{not json"), "eval summary is not valid JSON"),
        (lambda d: _write(d / "x.json", json.dumps({"benchmark": "gsm8k"})), "not an eval summary ('problems'"),
        (lambda d: _write(d / "x.json", json.dumps([1, 2])), "eval summary is not a JSON object"),
        (lambda d: _changed_summary(d, correct=60), "not an eval summary ('correct'"),
        (lambda d: _changed_summary(d, accuracy="40%"), "not an eval summary ('accuracy'"),
        (lambda d: _changed_summary(d, accuracy_ci95=[0.5, 0.2]), "not an eval summary ('accuracy_ci95'"),
    ],
)
def test_bad_eval_results_are_refused_before_writing(hub: dict, tmp_path: Path, make, message: str) -> None:
    bad = make(tmp_path / "evals")
    (tmp_path / "evals").mkdir(exist_ok=True)
    before = tree_digest(tmp_path)
    result = cli("transplant", "-t", "org/target", "-s", "org/source", "-o", tmp_path / "out", "--module", "*",
                 "--eval-results", bad)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".surgery-tmp-")]


def _changed_summary(folder: Path, **changes: object) -> Path:
    good = json.loads(eval_summary(_write(folder / "x.json", "")).read_text())
    return _write(folder / "x.json", json.dumps({**good, **changes}))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# push


def fake_api(pr: bool = False) -> HfApi:
    """An HfApi test double with the real signatures: a call with a wrong argument fails."""
    api = create_autospec(HfApi, instance=True)
    api.create_repo.return_value = RepoUrl(REPO_URL)
    api.upload_folder.return_value = CommitInfo(
        commit_url=f"{REPO_URL}/commit/{'a' * 40}",
        commit_message="m",
        commit_description="",
        oid="a" * 40,
        pr_url=f"{REPO_URL}/discussions/7" if pr else None,
    )
    return api


@pytest.fixture
def output(hub: dict, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    transplant(target="org/target", source="org/source", out=out, manifest=hub["manifest"], top_k=2, progress=False)
    return out


def uploaded(api: HfApi) -> tuple[Path, set[str]]:
    folder = Path(api.upload_folder.call_args.kwargs["folder_path"])
    return folder, {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_push_creates_the_repo_and_uploads_the_output(output: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(surgery.hub.publish, "make_api", lambda: pytest.fail("push must use the api it is given"))
    api = fake_api()
    url = push(output, "org/patched", private=True, api=api)
    assert url == REPO_URL
    api.create_repo.assert_called_once_with("org/patched", private=True, exist_ok=True, repo_type="model")
    api.create_branch.assert_not_called()
    kwargs = api.upload_folder.call_args.kwargs
    assert api.upload_folder.call_count == 1
    assert {k: kwargs[k] for k in ("repo_id", "repo_type", "revision", "create_pr")} == {
        "repo_id": "org/patched",
        "repo_type": "model",
        "revision": None,
        "create_pr": False,
    }
    assert kwargs["commit_message"].startswith("Upload transplant: 2 modules")
    folder, files = uploaded(api)
    assert folder == output
    shards = {p.name for p in output.glob("*.safetensors")}
    assert len(shards) > 1 and files == OUTPUT_FILES | shards
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == ["org/target", "org/source"]
    assert card.data.tags == ["model-transplant", "surgery"] and card.data.library_name == "transformers"


def test_push_to_a_branch_or_a_pull_request(output: Path) -> None:
    api = fake_api()
    assert push(output, "org/patched", revision="k2", api=api) == f"{REPO_URL}/tree/k2"
    api.create_repo.assert_called_once_with("org/patched", private=None, exist_ok=True, repo_type="model")
    api.create_branch.assert_called_once_with("org/patched", branch="k2", exist_ok=True, repo_type="model")
    assert api.upload_folder.call_args.kwargs["revision"] == "k2"

    api = fake_api(pr=True)
    assert push(output, "org/patched", create_pr=True, api=api) == f"{REPO_URL}/discussions/7"
    assert api.upload_folder.call_args.kwargs["create_pr"] is True
    api.create_branch.assert_not_called()


@pytest.mark.parametrize(
    ("folder", "kwargs", "message"),
    [
        (lambda out, tgt: tgt, {}, "no transplant.json, so not a complete `surgery transplant` output"),
        (lambda out, tgt: _copy(out, out.parent / ".surgery-tmp-out-x1"), {}, "an unfinished transplant"),
        (lambda out, tgt: out.parent / "missing", {}, "no such folder"),
        (lambda out, tgt: out, {"repo_id": "org/patched@main"}, "is not a Hub repo id to push to"),
        (lambda out, tgt: out, {"repo_id": "patched"}, "is not a Hub repo id to push to"),
        (lambda out, tgt: out, {"create_pr": True, "revision": "dev"}, "drop --revision"),
    ],
)
def test_push_refuses_before_calling_the_hub(hub: dict, output: Path, folder, kwargs: dict, message: str) -> None:
    api = fake_api()
    args = {"repo_id": "org/patched", **kwargs}
    with pytest.raises(SurgeryError, match=re.escape(message)):
        push(folder(output, hub["target"]), args.pop("repo_id"), api=api, **args)
    assert not api.method_calls, "nothing may be sent for a refused push"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_cli_push_prints_the_url_and_never_the_token(output: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = fake_api()
    monkeypatch.setattr(surgery.hub.publish, "make_api", lambda: api)
    result = cli("push", output, "--repo-id", "org/patched", "--private")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"pushed {output} to {REPO_URL}\n"
    assert FAKE_TOKEN not in result.output
    api.create_repo.assert_called_once_with("org/patched", private=True, exist_ok=True, repo_type="model")


@pytest.mark.parametrize(
    ("status", "expected"),
    [(401, "the Hub refused the push to org/patched (HTTP 401); log in with `hf auth login` or set HF_TOKEN"),
     (500, "pushing to org/patched failed (HTTP 500: upload of Bearer *** failed)")],
)  # fmt: skip
def test_cli_push_errors_are_one_line_without_the_token(
    output: Path, monkeypatch: pytest.MonkeyPatch, status: int, expected: str
) -> None:
    api = fake_api()
    request = httpx2.Request("POST", "https://huggingface.co/api/models/org/patched/commit/main")
    # A server message that (wrongly) echoes the token: it still must not reach the terminal.
    api.upload_folder.side_effect = HfHubHTTPError(
        f"upload of Bearer {FAKE_TOKEN} failed", response=httpx2.Response(status, request=request)
    )
    monkeypatch.setattr(surgery.hub.publish, "make_api", lambda: api)
    result = cli("push", output, "--repo-id", "org/patched")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {expected}") and result.stderr.count("\n") == 1, result.stderr
    assert FAKE_TOKEN not in result.output and "Traceback" not in result.output


def test_cli_push_offline_with_the_real_api_sends_nothing(output: Path) -> None:
    # The factory is not replaced: the real HfApi, under HF_HUB_OFFLINE=1, must stop at the first request.
    result = cli("push", output, "--repo-id", "org/patched")
    assert result.exit_code == 2, result.output
    assert result.stderr == "error: cannot push to org/patched: HF_HUB_OFFLINE is set; unset it to push\n"


def test_transplant_push_to_hub(hub: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = fake_api()
    monkeypatch.setattr(surgery.hub.publish, "make_api", lambda: api)
    out = tmp_path / "out"
    result = cli("transplant", "-t", "org/target", "-s", "org/source", "-o", out, "-m", hub["manifest"], "-k", 3,
                 "--push-to-hub", "org/patched", "--private", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"pushed to {REPO_URL}"
    assert FAKE_TOKEN not in result.output
    api.create_repo.assert_called_once_with("org/patched", private=True, exist_ok=True, repo_type="model")
    folder, files = uploaded(api)
    assert folder == out.resolve() and files == OUTPUT_FILES | {p.name for p in out.glob("*.safetensors")}
    assert json.loads((folder / "transplant.json").read_text())["modules"][0] == "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--push-to-hub", "not a repo"], "'not a repo' is not a Hub repo id to push to"),
        (["--private"], "--private only applies with --push-to-hub"),
    ],
)
def test_transplant_push_options_are_checked_before_writing(
    hub: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], message: str
) -> None:
    monkeypatch.setattr(surgery.hub.publish, "make_api", lambda: pytest.fail("nothing may be sent"))
    before = tree_digest(tmp_path)
    result = cli("transplant", "-t", "org/target", "-s", "org/source", "-o", tmp_path / "out", "--module", "*", *extra)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_transplant_keeps_its_output_when_the_push_fails(
    hub: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = fake_api()
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    api.create_repo.side_effect = HfHubHTTPError("Unauthorized", response=httpx2.Response(401, request=request))
    monkeypatch.setattr(surgery.hub.publish, "make_api", lambda: api)
    out = tmp_path / "out"
    result = cli("transplant", "-t", "org/target", "-s", "org/source", "-o", out, "--module", "*.0.mlp.*",
                 "--push-to-hub", "org/patched", "-q")  # fmt: skip
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "(HTTP 401); log in with `hf auth login`" in result.stderr
    assert f"the output is at {out.resolve()}; retry with `surgery push {out.resolve()} --repo-id org/patched`" in (
        result.stderr
    )
    assert (out / "transplant.json").is_file() and (out / "README.md").is_file()
    api.upload_folder.assert_not_called()


def test_a_push_without_network_is_one_line(output: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: the HTTP client's own error (httpx.ConnectError, not an OSError) was an 88-line traceback."""
    api = fake_api()
    api.create_repo.side_effect = httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(surgery.hub.publish, "make_api", lambda: api)
    result = cli("push", output, "--repo-id", "me/x")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("error: pushing to me/x failed (ConnectError: [Errno -3]"), result.stderr


def test_push_uploads_a_patch_folder_with_a_card_naming_its_base(hub: dict, tmp_path: Path) -> None:
    patch = tmp_path / "patch"
    write_patch(target="org/target", source="org/source", out=patch, manifest=hub["manifest"], top_k=2, progress=False)
    api = fake_api()
    push(patch, "org/my-patch", api=api)
    assert api.upload_folder.call_args.kwargs["commit_message"].startswith("Upload patch: 2 modules")
    folder, files = uploaded(api)
    assert folder == patch and files == {"README.md", "patch.json", "patch.safetensors"}
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == ["org/target"] and "surgery-patch" in card.data.tags
    assert "surgery apply patch --target org/target" in card.text
    # A tampered patch is refused before anything is sent.
    (patch / "patch.json").write_text((patch / "patch.json").read_text().replace('"sha256": "', '"sha256": "0'))
    api = fake_api()
    with pytest.raises(SurgeryError, match="differs from its sha256"):
        push(patch, "org/my-patch", api=api)
    assert not api.method_calls


def test_eval_results_of_another_model_are_refused_or_noted_with_force(hub: dict, tmp_path: Path) -> None:
    """A summary of the target (or of anything but this output) never lands silently in the card."""
    target_summary = eval_summary(tmp_path / "t.json", fingerprint=open_checkpoint(hub["target"]).fingerprint)
    out = tmp_path / "out"
    args = ["transplant", "-t", hub["target"], "-s", hub["source"], "-o", out, "--module", "*.0.mlp.down_proj", "-q"]
    refused = cli(*args, "--eval-results", target_summary)
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert f"{target_summary} measured another model" in refused.stderr and "--force" in refused.stderr
    assert not out.exists()
    # --dry-run refuses it as the write would, and passes with --force.
    dry = cli(*args, "--eval-results", target_summary, "--dry-run")
    assert dry.exit_code == 2 and f"{target_summary} measured another model" in dry.stderr
    assert cli(*args, "--eval-results", target_summary, "--force", "--dry-run").exit_code == 0
    assert not out.exists()
    forced = cli(*args, "--eval-results", target_summary, "--force")
    assert forced.exit_code == 0 and "attached because of --force" in forced.stderr
    card = (out / "README.md").read_text()
    assert "**Note:** `t.json` (gsm8k) was measured on another model" in card
