"""A model's keep NLL on a keep set W: measured (`keep_nll`) and kept in a results folder (`keep/<name>.json`).

A keep set is what the target must not lose (`general-text:N`, `stdlib-docs:N`, or a JSONL of texts or
rendered prompts with solutions). `surgery eval MODEL --keep W -o FOLDER` measures the loaded model's
teacher-forced NLL per row of W once (one forward pass per batch: seconds to minutes) and writes it beside
the generation's results; `surgery report --keep W` reads it from the source's, target's and each patched
model's folder to compute Retention (`metrics.retention`). A file records which rows it measured (the
workload's name, sha256 and row count) and which model in which dtype, so that neither a rerun nor a
report mixes it with another measurement.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from surgery.analysis.nll import GoldSet, encode_gold, gold_nll
from surgery.analysis.workloads import PromptSet, load_workload, require_solutions
from surgery.errors import SurgeryError
from surgery.fileio import read_json_object, write_json_atomic

KEEP_DIR = "keep"


def keep_nll(model, tokenizer, workload: PromptSet, chat: bool) -> list[float]:
    """The loaded model's NLL per row of `workload` (a keep set, or any workload with solutions), in nats per token
    (NaN for a row with nothing scored).

    Raises:
        SurgeryError: the workload has no solutions, or its prompts fail to render.
    """
    return measured(model, encode_gold(tokenizer, workload, chat))


def measured(model, gold: GoldSet) -> list[float]:
    """`gold_nll` of an encoded workload, per row."""
    return gold_nll(model, gold.prompts, gold.solutions, gold.pad_id)


@dataclass(frozen=True)
class KeepNLL:
    """A keep file (`to_dict` is its JSON): one model's NLL per row of a keep set, and what was measured.

    Attributes:
        workload, sha256, rows: the keep set (`PromptSet.name`, `.sha256` and its row count).
        nll: nats per token, per row, in the workload's order (NaN, `null` in the file, where nothing was scored).
        mean: the mean over the rows scored.
        model_fingerprint: the model measured (with `eval --patch`, the checkpoint `surgery apply` would write).
        dtype: the dtype the weights were computed in.
        chat: whether the prompts went through the chat template (never for plain text).
    """

    workload: str
    sha256: str
    rows: int
    nll: tuple[float, ...]
    mean: float
    model_fingerprint: str
    dtype: str
    chat: bool

    @classmethod
    def of(cls, workload: PromptSet, nll: list[float], *, fingerprint: str, dtype: str, chat: bool) -> KeepNLL:
        scored = [v for v in nll if v == v]
        mean = sum(scored) / len(scored) if scored else float("nan")
        return cls(workload.name, workload.sha256, len(nll), tuple(nll), mean, fingerprint, dtype, chat)

    def to_dict(self) -> dict:
        return {**asdict(self), "nll": [v if v == v else None for v in self.nll]}

    @classmethod
    def from_dict(cls, d: dict, path: Path) -> KeepNLL:
        try:
            nll = tuple(float("nan") if v is None else float(v) for v in d["nll"])
            record = cls(**{**{f.name: d[f.name] for f in fields(cls)}, "nll": nll})
        except (KeyError, TypeError, ValueError):
            raise SurgeryError(
                f"{path} is not a keep file of `surgery eval --keep`; delete it and rerun that eval with --keep"
            ) from None
        if len(nll) != record.rows:
            raise SurgeryError(f"{path} holds {len(nll)} NLLs for {record.rows} rows; delete it and rerun with --keep")
        return record

    def same_rows(self, workload: PromptSet) -> bool:
        return (self.workload, self.sha256, self.rows) == (workload.name, workload.sha256, len(workload.prompts))


def keep_sets(specs: list[str] | tuple[str, ...]) -> list[PromptSet]:
    """The keep sets of `eval --keep` (each once), checked before anything loads.

    Raises:
        SurgeryError: a set is unknown or has no solutions, or two sets would share a keep file.
    """
    sets: dict[Path, PromptSet] = {}
    for spec in specs:
        workload = load_workload(spec)
        require_solutions(workload, "--keep")
        path = keep_path(Path(), workload.name)
        other = sets.setdefault(path, workload)
        if (other.name, other.sha256) != (workload.name, workload.sha256):
            raise SurgeryError(
                f"two --keep sets ({other.name} and {workload.name}, other rows) would share the keep file "
                f"{path}; give one file another name"
            )
    return list(sets.values())


def keep_path(folder: Path, workload: str) -> Path:
    """Where a results folder keeps its NLL on the workload of this name: `keep/<name, made a safe file name>.json`."""
    return folder / KEEP_DIR / (re.sub(r"[^A-Za-z0-9._-]+", "-", workload) + ".json")


def load_keep(path: Path) -> KeepNLL:
    return KeepNLL.from_dict(read_json_object(path, "keep file", "delete it and rerun with --keep"), path)


def reusable(folder: Path, workload: PromptSet, *, fingerprint: str, dtype: str, chat: bool) -> KeepNLL | None:
    """The keep file of `folder` for `workload` when it holds this very measurement, None when there is none.

    Raises:
        SurgeryError: it holds a measurement of other rows, another model, or another dtype or prompt format.
    """
    path = keep_path(folder.absolute(), workload.name)  # absolute in messages, as in every refusal
    if not path.is_file():
        return None
    old = load_keep(path)
    if not old.same_rows(workload):
        raise SurgeryError(
            f"{path} holds the keep NLL of other rows ({old.workload}, {old.rows} rows, sha256 {old.sha256[:12]}…) "
            f"than {workload.name} ({len(workload.prompts)} rows, sha256 {workload.sha256[:12]}…); "
            "use a new -o, or delete that file to measure again"
        )
    now = {"model_fingerprint": fingerprint, "dtype": dtype, "chat": chat}
    for key, value in now.items():
        if getattr(old, key) != value:
            raise SurgeryError(
                f"{path} holds the keep NLL of another measurement ({key}: {getattr(old, key)!r}, now {value!r}); "
                "use a new -o, or delete that file to measure again"
            )
    return old


def save_keep(folder: Path, record: KeepNLL) -> Path:
    path = keep_path(folder, record.workload)
    write_json_atomic(path, record.to_dict())
    return path


def read_keep(folder: Path, spec: str) -> KeepNLL:
    """The keep NLL on the keep set `spec` that `surgery eval --keep` wrote into a results folder.

    Raises:
        SurgeryError: there is none, or it was measured on other rows; the message names the eval that makes it.
    """
    workload, folder = load_workload(spec), folder.absolute()  # absolute in messages, as in every refusal
    path = keep_path(folder, workload.name)
    fix = f"surgery eval MODEL --keep {spec} -o {folder}"
    if not path.is_file():
        raise SurgeryError(
            f"{folder} has no keep NLL on {workload.name}; measure it with `{fix}` (with that eval's other flags)"
        )
    record = load_keep(path)
    if not record.same_rows(workload):
        raise SurgeryError(
            f"{path} was measured on other rows ({record.rows} rows, sha256 {record.sha256[:12]}…) than "
            f"{workload.name} ({len(workload.prompts)} rows, sha256 {workload.sha256[:12]}…); delete it and run `{fix}`"
        )
    return record
