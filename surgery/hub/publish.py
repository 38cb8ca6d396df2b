"""Publish a transplant output: `push` uploads a complete output folder to a Hub model repo.

The token comes only from huggingface_hub's own resolution (`HF_TOKEN`, or `hf auth login`); surgery
never reads, prints or logs it, and error texts from the Hub are masked before they are shown.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from surgery.checkpoints.hub_inputs import LOGIN_HINT, hub_error_line, parse_repo_spec
from surgery.errors import SurgeryError
from surgery.transplants.patch import PATCH_RECORD, open_patch
from surgery.transplants.write import check_output
from surgery.version import __version__


def make_api() -> HfApi:
    """The `HfApi` that `push` uses unless given one (tests replace this factory).

    No token is passed: huggingface_hub resolves it itself (`HF_TOKEN`, or `hf auth login`).
    """
    return HfApi(library_name="surgery", library_version=__version__)


def check_push_options(repo_id: str, *, create_pr: bool = False, revision: str | None = None) -> None:
    """Refuse push options that cannot work, before anything is written or sent.

    Raises:
        SurgeryError: `repo_id` is not `org/name`, or both `create_pr` and `revision` are set.
    """
    spec = parse_repo_spec(repo_id)
    if spec is None or spec[1] is not None:
        raise SurgeryError(f"{repo_id!r} is not a Hub repo id to push to; use org/name (a branch goes in --revision)")
    if create_pr and revision is not None:
        # huggingface_hub opens pull requests against the default branch only.
        raise SurgeryError("--create-pr opens a pull request against the main branch; drop --revision")


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    create_pr: bool = False,
    revision: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload a complete transplant output to a Hub model repo, creating the repo if needed.

    Args:
        folder: the output folder of `surgery transplant` (with `transplant.json`), or a patch folder
            of `surgery transplant --patch` (with `patch.json`).
        repo_id: `org/name`.
        private: create the repo private (an existing repo keeps its visibility).
        create_pr: open a pull request instead of committing to the branch.
        revision: the branch to commit to (created from main if missing); default main.
        api: the client to use; default `make_api()`.

    Returns:
        The URL of the repo (of the branch, or of the pull request).

    Raises:
        SurgeryError: the folder is not a complete transplant output, the options are invalid, or
            the Hub refuses (not logged in, no write access, offline).
    """
    check_push_options(repo_id, create_pr=create_pr, revision=revision)
    out = Path(folder)
    if (out / PATCH_RECORD).is_file():
        # A patch folder (`transplant --patch`): checked whole, sha256 included, before anything is sent.
        modules, what = open_patch(out).modules, "patch"
    else:
        modules, what = list(check_output(out).modules), "transplant"
    api = api if api is not None else make_api()
    message = f"Upload {what}: {len(modules)} modules (surgery {__version__})"
    try:
        # private=None keeps the account's default visibility (some organizations default to private).
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=out,
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=message,
        )
    except Exception as e:
        # Whatever fails on the way to the Hub is one line: huggingface_hub's HTTP and offline errors,
        # a refused argument (ValueError), and the HTTP client's own, such as httpx.ConnectError offline.
        raise SurgeryError(_push_error(repo_id, e)) from None
    if create_pr:
        return str(info.pr_url)
    return f"{url}/tree/{revision}" if revision is not None else str(url)


def _push_error(repo_id: str, e: Exception) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it to push"
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code
        if status in (401, 403):
            return f"the Hub refused the push to {repo_id} (HTTP {status}); {LOGIN_HINT} with a token that can write"
        return f"pushing to {repo_id} failed (HTTP {status}: {hub_error_line(e)})"
    return f"pushing to {repo_id} failed ({type(e).__name__}: {hub_error_line(e)})"
