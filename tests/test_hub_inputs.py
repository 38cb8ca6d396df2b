"""Hub repo ids (`org/name[@revision]`) as checkpoint arguments, from a real HF cache folder, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx2
import huggingface_hub
import huggingface_hub.constants
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from surgery import open_checkpoint
from surgery.checkpoints.hub_inputs import parse_repo_spec
from tests.helpers import cli, make_model, refused, tree_digest
from tests.hub_cache import add_snapshot, commit_hash, offline_hub

MAIN = commit_hash("main")
V2 = commit_hash("v2")
FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdef"


@pytest.fixture
def hub(tmp_path: Path, sharded_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> dict:
    """An offline cache with org/source and org/target (main) and a different single-file org/target at v2."""
    cache = tmp_path / "hf-cache"
    src, tgt = sharded_pair
    other = make_model(tmp_path / "other", 3)
    snapshots = {
        "source": add_snapshot(cache, "org/source", src, MAIN),
        "target": add_snapshot(cache, "org/target", tgt, MAIN),
        "v2": add_snapshot(cache, "org/target", other, V2, refs=("v2",)),
    }
    offline_hub(monkeypatch, cache)
    return {
        "cache": cache,
        "source": src,
        "target": tgt,
        "other": other,
        **{f"snap_{k}": v for k, v in snapshots.items()},
    }


def test_snapshot_files_are_symlinks_out_of_the_snapshot(hub: dict) -> None:
    # The premise of the layout: what the resolver must cope with.
    link = hub["snap_target"] / "config.json"
    assert link.is_symlink() and hub["snap_target"] not in link.resolve().parents
    assert link.resolve().parent.name == "blobs"


@pytest.mark.parametrize("spec", ["org/target", "org/target@main", f"org/target@{MAIN}"])
def test_inspect_repo_id(hub: dict, spec: str) -> None:
    result = cli("inspect", spec, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert Path(info["path"]) == hub["snap_target"].resolve()
    assert info["repo"] == f"org/target@{MAIN}"
    assert info["fingerprint"] == open_checkpoint(hub["target"]).fingerprint
    assert info["shards"] == len(list(hub["target"].glob("*.safetensors"))) > 1


def test_revision_selects_that_snapshot(hub: dict) -> None:
    ckpt = open_checkpoint("org/target@v2")
    assert ckpt.path == hub["snap_v2"].resolve()
    assert (ckpt.hub.repo_id, ckpt.hub.revision, ckpt.hub.commit) == ("org/target", "v2", V2)
    assert ckpt.fingerprint == open_checkpoint(hub["other"]).fingerprint != open_checkpoint("org/target").fingerprint
    text = cli("inspect", "org/target@v2")
    assert text.exit_code == 0 and f"repo             org/target@{V2}" in text.stdout


def test_local_path_wins_and_cache_paths_keep_their_repo(
    hub: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A folder that happens to be named like a repo id is a folder.
    local = make_model(tmp_path / "org" / "target", 4)
    monkeypatch.chdir(tmp_path)
    assert open_checkpoint("org/target").path == local.resolve()
    assert open_checkpoint("org/target").hub is None
    # A snapshot folder passed as a path is recognised as the repo it holds.
    ckpt = open_checkpoint(str(hub["snap_source"]))
    assert (ckpt.hub.repo_id, ckpt.hub.commit) == ("org/source", MAIN)


def test_transplant_from_repo_ids_equals_transplant_from_folders(hub: dict, tmp_path: Path) -> None:
    before = tree_digest(hub["cache"])
    by_id, local = tmp_path / "by-id", tmp_path / "local"
    r1 = cli("transplant", "-t", "org/target", "-s", "org/source@main", "-o", by_id, "--module", "*.1.mlp.*", "-q")
    r2 = cli("transplant", "-t", hub["target"], "-s", hub["source"], "-o", local, "--module", "*.1.mlp.*", "-q")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert tree_digest(hub["cache"]) == before, "the cache was modified"

    # Same files with the same bytes, except the card (names differ) and the provenance, which
    # records where the inputs came from.
    got, want = tree_digest(by_id), tree_digest(local)
    assert got.keys() == want.keys() and "README.md" in got and "config.json" in got
    same = [k for k in got if not k.endswith(".safetensors") and k not in ("README.md", "transplant.json")]
    assert len(same) == 4  # config, generation config, tokenizer config, index
    assert {k: got[k] for k in same} == {k: want[k] for k in same}
    a, b = open_checkpoint(by_id), open_checkpoint(local)
    assert a.tensors.keys() == b.tensors.keys()
    for name, ref in a.tensors.items():
        other = b.tensors[name]
        assert ref.shard.path.name == other.shard.path.name and ref.info == other.info
        assert _tensor_bytes(ref) == _tensor_bytes(other), name
    rec_a, rec_b = (json.loads((p / "transplant.json").read_text()) for p in (by_id, local))
    assert (
        rec_a["modules"]
        == rec_b["modules"]
        == [f"model.layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    )
    assert rec_a["tensors"] == rec_b["tensors"]
    assert rec_a["target"]["hub"] == {"repo_id": "org/target", "revision": None, "commit": MAIN}
    assert rec_a["source"]["hub"] == {"repo_id": "org/source", "revision": "main", "commit": MAIN}
    assert "hub" not in rec_b["target"]

    ok = cli("verify", by_id, "-t", "org/target", "-s", "org/source")
    assert ok.exit_code == 0 and ok.stdout.startswith("ok: 21 tensors, "), ok.output
    assert "(3 from the source), and" in ok.stdout


def _tensor_bytes(ref) -> bytes:
    with open(ref.shard.path, "rb") as f:
        f.seek(ref.offset)
        return f.read(ref.info.nbytes)


def test_manifest_from_repo_ids_records_the_commit(hub: dict, tmp_path: Path) -> None:
    out = tmp_path / "wd.json"
    result = cli("manifest", "-s", "org/source", "-t", "org/target@main", "--method", "weight-delta", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads(out.read_text())
    assert manifest["source"]["path"] == "org/source" and manifest["source"]["revision"] == MAIN
    # The repo id, pinned by its commit: `@main` as typed would name whatever main is later.
    assert manifest["target"]["path"] == "org/target" and manifest["target"]["revision"] == MAIN
    assert manifest["target"]["fingerprint"] == open_checkpoint(hub["target"]).fingerprint


@pytest.mark.parametrize("arg", ["no/such/folder", "./missing-folder", "bad name/x", "org/name@"])
def test_neither_a_path_nor_a_repo_id(hub: dict, tmp_path: Path, arg: str) -> None:
    assert parse_repo_spec(arg) is None
    refused(["inspect", arg], f"{arg}: no such checkpoint folder", "not a Hub repo id", watch=tmp_path)


def test_repo_not_in_cache_while_offline(hub: dict, tmp_path: Path) -> None:
    refused(
        ["transplant", "-t", "org/absent", "-s", "org/source", "-o", tmp_path / "out", "--module", "*"],
        "org/absent: no such local folder, and Hub repo org/absent is not in the cache",
        "HF_HUB_OFFLINE is set",
        watch=tmp_path,
    )


@pytest.mark.parametrize("revision", ["nope", commit_hash("never")])
def test_revision_not_in_cache_while_offline(hub: dict, tmp_path: Path, revision: str) -> None:
    refused(
        ["compat", "org/source", f"org/target@{revision}"],
        f"revision {revision!r} of Hub repo org/target is not in the cache",
        "HF_HUB_OFFLINE",
        watch=tmp_path,
    )


def _http_error(cls: type[HfHubHTTPError], status: int, message: str) -> HfHubHTTPError:
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/private")
    return cls(message, response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("error", "messages"),
    [
        (_http_error(RevisionNotFoundError, 404, "Revision Not Found"), ["has no revision 'dev'"]),
        (_http_error(GatedRepoError, 403, "Access restricted"), ["is gated", "hf auth login", "HF_TOKEN"]),
        (_http_error(RepositoryNotFoundError, 401, "Not Found"), ["does not exist or is private", "hf auth login"]),
        (_http_error(HfHubHTTPError, 401, "Unauthorized"), ["refused access", "hf auth login", "HF_TOKEN"]),
        # An error text that carries the token must not show it.
        (
            _http_error(HfHubHTTPError, 500, f"Server error for Bearer {FAKE_TOKEN}, hf_AnotherToken0123456789"),
            ["(HfHubHTTPError: Server error for Bearer ***, hf_***)"],
        ),
    ],
)
def test_hub_errors_are_one_line_and_never_show_the_token(
    hub: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, messages: list[str]
) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    calls = []

    def fail(repo_id: str, **kwargs) -> str:
        calls.append((repo_id, kwargs.get("revision")))
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    refused(["inspect", "org/private@dev"], "org/private@dev: ", *messages, watch=tmp_path, secret=FAKE_TOKEN)
    assert calls == [("org/private", "dev")]


def test_offline_hub_is_undone_after_the_test(tmp_path: Path) -> None:
    constants = huggingface_hub.constants
    before = (constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, os.environ.get("HF_HUB_OFFLINE"))
    with pytest.MonkeyPatch.context() as mp:
        offline_hub(mp, tmp_path)
        assert constants.is_offline_mode()
        assert Path(constants.HF_HUB_CACHE) == tmp_path
    assert (constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, os.environ.get("HF_HUB_OFFLINE")) == before
