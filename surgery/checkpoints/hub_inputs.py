"""Checkpoint arguments that name a Hugging Face Hub repo: `org/name[@revision]` becomes a cached snapshot folder.

Every command opens its checkpoints through `surgery.checkpoints.folder.open_checkpoint`, which calls
`resolve_checkpoint` here, so all of them accept repo ids. An existing local path always wins;
otherwise an `org/name[@revision]` argument is resolved with `huggingface_hub.snapshot_download`
through the standard cache (`HF_HUB_CACHE`), so `HF_HUB_OFFLINE=1` works from what is cached.
Only what surgery reads is fetched: config, generation config, tokenizer, chat template, model code
(used only with --trust-remote-code) and the safetensors weights the index names.

Snapshot files are symlinks into the repo's `blobs/` folder, outside the snapshot folder. The rule
refusing symlinks that leave a checkpoint folder (`surgery.checkpoints.folder.check_links`) allows them when
the folder is a snapshot: `cache_repo_folder` gives the repo folder whose `blobs/` they may point into.

huggingface_hub is imported only when an argument is not a local path: opening local folders
(the transplant fast path) stays free of its import cost.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoints.files import INDEX_FILE, SINGLE_FILE
from surgery.errors import SurgeryError
from surgery.fileio import read_json_object

# Files a checkpoint folder needs besides its weights (transplant copies them; profile and eval load them).
_METADATA_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    # Custom model code for configs with `auto_map`; executed only with --trust-remote-code.
    "*.py",
]
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
# User access tokens look like hf_ followed by letters and digits.
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


@dataclass(frozen=True)
class HubRef:
    """Where a checkpoint came from on the Hub.

    Attributes:
        repo_id: `org/name`.
        revision: the branch, tag or commit asked for; None for the default branch.
        commit: the commit hash of the snapshot that was opened.
    """

    repo_id: str
    revision: str | None
    commit: str


@dataclass(frozen=True)
class ResolvedInput:
    """A checkpoint argument made local: the folder to open and, for Hub snapshots, their origin."""

    path: Path
    hub: HubRef | None


def parse_repo_spec(text: str) -> tuple[str, str | None] | None:
    """Split `org/name[@revision]` into the repo id and revision.

    Only `org/name` ids are accepted, not bare names such as `gpt2`: a mistyped local folder
    name should not turn into a Hub look-up.

    Args:
        text: the argument.

    Returns:
        (repo_id, revision or None), or None when `text` is not of that form.
    """
    repo_id, at, revision = text.partition("@")
    if at and (not revision or any(c.isspace() for c in revision)):
        return None
    if repo_id.count("/") != 1:
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def cache_repo_folder(folder: Path) -> Path | None:
    """The cache's `models--org--name` folder when `folder` is one of its snapshots, else None.

    A snapshot's files are symlinks into `<repo folder>/blobs/`.
    """
    snapshots = folder.parent
    if (
        snapshots.name == "snapshots"
        and snapshots.parent.name.startswith("models--")
        and _COMMIT_RE.fullmatch(folder.name)
    ):
        return snapshots.parent
    return None


def resolve_checkpoint(arg: str | Path) -> ResolvedInput:
    """Turn a checkpoint argument into a local folder, downloading (or reading the cache) for repo ids.

    Args:
        arg: a local path, or (as a str) `org/name[@revision]`. A `Path` is always local.

    Returns:
        The folder to open (not checked here beyond existence) and its Hub origin, if any; a local
        path inside the HF cache (`.../models--org--name/snapshots/<commit>`) gets its origin too.

    Raises:
        SurgeryError: the argument is neither an existing path nor a repo id, or the repo cannot be
            had (not cached while offline, no such revision, gated or private, Hub unreachable).
    """
    path = Path(arg)
    if isinstance(arg, Path) or path.exists():
        repo = cache_repo_folder(path.resolve()) if path.is_dir() else None
        hub = HubRef(_repo_id_of(repo), None, path.resolve().name) if repo is not None else None
        return ResolvedInput(path, hub)
    spec = parse_repo_spec(arg)
    if spec is None:
        raise SurgeryError(
            f"{arg}: no such checkpoint folder, and not a Hub repo id (org/name[@revision]); check the path"
        )
    repo_id, revision = spec
    folder = _download(arg, repo_id, revision)
    return ResolvedInput(folder, HubRef(repo_id, revision, folder.name))


def _repo_id_of(repo_folder: Path) -> str:
    # "models--org--name" -> "org/name"; repo ids cannot contain "--", so this is unambiguous.
    return repo_folder.name.removeprefix("models--").replace("--", "/")


def _download(arg: str, repo_id: str, revision: str | None) -> Path:
    """Snapshot the files surgery reads, in two steps so that only the shards the index names are fetched.

    `*.safetensors` would also fetch duplicates some repos carry (Mistral's `consolidated.safetensors`
    doubles the download), so the index is read first and its shards are named exactly.
    """
    from huggingface_hub import snapshot_download

    try:
        meta = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*_METADATA_PATTERNS, INDEX_FILE]))
        index = meta / INDEX_FILE
        if index.is_file():
            weight_map = read_json_object(index, "index", "the repo's index is corrupt").get("weight_map")
            # A malformed index fetches no shards; open_checkpoint then says what is wrong with it.
            names = set(weight_map.values()) if isinstance(weight_map, dict) else set()
            # Shard names are patterns to snapshot_download: escape any glob characters in them.
            weights = [glob.escape(n) for n in sorted(names) if isinstance(n, str)]
        else:
            weights = [SINGLE_FILE]
        # Pinned to the commit just resolved, so a branch moving in between cannot mix two commits.
        folder = snapshot_download(
            repo_id, revision=meta.name, allow_patterns=[*_METADATA_PATTERNS, INDEX_FILE, *weights]
        )
    except (OSError, ValueError) as e:
        # huggingface_hub's errors are OSErrors (HTTP errors, a missing cache entry) or ValueErrors.
        raise SurgeryError(_download_error(arg, repo_id, revision, e)) from None
    return Path(folder)


def _download_error(arg: str, repo_id: str, revision: str | None, e: Exception) -> str:
    """One line for a failed snapshot: what went wrong and how to fix it, never the token."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.file_download import repo_folder_name

    rev = revision or "main"
    missing = f"{arg}: no such local folder, and Hub repo {repo_id}"
    if isinstance(e, GatedRepoError):
        return (
            f"{arg}: Hub repo {repo_id} is gated; accept its conditions on https://huggingface.co/{repo_id}, "
            f"then {LOGIN_HINT}"
        )
    if isinstance(e, RepositoryNotFoundError):
        return f"{missing} does not exist or is private; check the path or id, or if the repo is private {LOGIN_HINT}"
    if isinstance(e, RevisionNotFoundError):
        return f"{arg}: Hub repo {repo_id} has no revision {rev!r}; pass an existing branch, tag or commit"
    if isinstance(e, HfHubHTTPError) and e.response.status_code in (401, 403):
        return f"{arg}: the Hub refused access to {repo_id} (HTTP {e.response.status_code}); {LOGIN_HINT}"
    if isinstance(e, IncompleteSnapshotError):
        return f"{arg}: the cached snapshot of {repo_id} is incomplete and the Hub cannot be reached; rerun online"
    if isinstance(e, LocalEntryNotFoundError) and constants.is_offline_mode():
        cache = Path(constants.HF_HUB_CACHE)
        if (cache / repo_folder_name(repo_id=repo_id, repo_type="model")).is_dir():
            return (
                f"{arg}: revision {rev!r} of Hub repo {repo_id} is not in the cache ({cache}) and HF_HUB_OFFLINE "
                "is set; pass a cached revision, or unset HF_HUB_OFFLINE to download it"
            )
        return (
            f"{missing} is not in the cache ({cache}) and HF_HUB_OFFLINE is set; "
            f"download it once online (`hf download {repo_id}`) or unset HF_HUB_OFFLINE"
        )
    if isinstance(e, LocalEntryNotFoundError):
        return f"{missing} cannot be reached and is not in the cache; check the connection and rerun"
    return f"{arg}: fetching Hub repo {repo_id} failed ({type(e).__name__}: {hub_error_line(e)})"


def hub_error_line(e: BaseException) -> str:
    """The first line of a Hub error's message, with anything that looks like an access token masked.

    Error texts are not supposed to carry the token, but it must never reach a terminal or a log
    even if one does.
    """
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        secret = os.environ.get(var, "").strip()
        if secret:
            text = text.replace(secret, "***")
    return _TOKEN_RE.sub("hf_***", text)
