"""`surgery report`: TIR and Recovery of patched models against their source and target, and with `--keep W`
their Retention on the keep set W (from the keep files `surgery eval --keep W` wrote)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.evaluation.keep import KeepNLL, keep_path, read_keep
from surgery.evaluation.metrics import Retention, describe, paired_bootstrap, recovery, retention, tir
from surgery.evaluation.runner import RECORDS, SUMMARY, read_records
from surgery.fileio import read_json_object, write_json_atomic


def _load(folder: str | Path) -> tuple[dict, dict[str, bool], dict[str, float]]:
    """Summary, correctness per problem id, and gold NLL per problem id (NaN where it has none)."""
    folder = Path(folder)
    summary = read_json_object(folder / SUMMARY, "eval summary", "pass a results folder written by `surgery eval`")
    records = read_records(folder / RECORDS)
    if len(records) != summary.get("problems"):
        raise SurgeryError(f"{folder}: {len(records)} records but the summary says {summary.get('problems')}")
    nan = float("nan")
    return summary, {r["id"]: bool(r["correct"]) for r in records}, {r["id"]: r.get("nll", nan) for r in records}


Interval = tuple[float, float] | list[float]  # a 95% interval: from the bootstrap, or as read from a summary


@dataclass(frozen=True)
class Baseline:
    """A baseline's results in a report: its folder, accuracy with its 95% Wilson interval, mean gold NLL."""

    folder: str
    accuracy: float
    accuracy_ci95: Interval
    nll: float | None


@dataclass(frozen=True)
class ReportRow:
    """One patched model against the baselines; an undefined metric is None and its `*_undefined` says why.

    `nll_source` and `nll_target` are the baselines' gold NLL on the problems all three scored (None, and
    left out of the JSON, where none has one). `keep_nll` (the mean keep NLL) and `retention` are there only
    with `report --keep` (None, and left out of the JSON, without).
    """

    patched: str
    accuracy: float
    accuracy_ci95: Interval
    tir: float | None
    tir_ci95: Interval | None
    tir_undefined: str | None
    recovery_pct: float | None
    recovery_ci95: Interval | None
    recovery_undefined: str | None
    nll: float | None
    nll_source: float | None
    nll_target: float | None
    nll_recovery_pct: float | None
    nll_recovery_ci95: Interval | None
    nll_undefined: str | None
    keep_nll: float | None = None
    retention: Retention | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.nll is None:
            del d["nll_source"], d["nll_target"]
        if self.retention is None:
            del d["keep_nll"], d["retention"]
        return d


@dataclass(frozen=True)
class KeepSet:
    """The keep set of `report --keep`: which rows (`PromptSet` name, sha256, count), and the baselines' mean
    keep NLL on them in nats per token."""

    workload: str
    sha256: str
    rows: int
    source_nll: float
    target_nll: float


@dataclass(frozen=True)
class Report:
    """What `report` found (`to_dict` is the JSON `report -o` writes)."""

    benchmark: str
    problems: int
    source: Baseline
    target: Baseline
    rows: tuple[ReportRow, ...]
    keep: KeepSet | None = None

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "problems": self.problems,
            "source": asdict(self.source),
            "target": asdict(self.target),
            **({"keep": asdict(self.keep)} if self.keep else {}),
            "rows": [r.to_dict() for r in self.rows],
        }


def _nll_row(s_nll: dict[str, float], t_nll: dict[str, float], p_nll: dict[str, float], samples: int) -> dict:
    """Gold-NLL recovery: the share of the source-target NLL gap the patch closes, on problems all three scored.

    A continuous counterpart of accuracy Recovery; it still moves when a small model's accuracy is ~0.
    """
    ids = [i for i in t_nll if all(x[i] == x[i] for x in (s_nll, t_nll, p_nll))]  # x == x drops NaN
    if not ids:
        return {
            **dict.fromkeys(("nll", "nll_source", "nll_target", "nll_recovery_pct", "nll_recovery_ci95")),
            "nll_undefined": "no gold NLL",
        }
    s, t, p = ([x[i] for i in ids] for x in (s_nll, t_nll, p_nll))
    mean = [sum(v) / len(ids) for v in (s, t, p)]
    return {
        "nll": mean[2],
        "nll_source": mean[0],
        "nll_target": mean[1],
        "nll_recovery_pct": recovery(mean[2], mean[1], mean[0]),
        "nll_recovery_ci95": paired_bootstrap(s, t, p, samples)["recovery"],
        "nll_undefined": None if mean[0] != mean[1] else "source and target gold NLLs are equal (no gap)",
    }


def _keep_of(folder: str | Path, summary: dict, spec: str) -> KeepNLL:
    """The keep file of a results folder, checked to be of the model its eval measured."""
    folder = Path(folder).absolute()
    record = read_keep(folder, spec)
    evaluated = summary["settings"].get("model_fingerprint")
    if record.model_fingerprint != evaluated:
        raise SurgeryError(
            f"{keep_path(folder, record.workload)} measured another model (fingerprint "
            f"{record.model_fingerprint[:19]}…) than the eval in {folder} ({str(evaluated)[:19]}…); delete it and "
            f"run `surgery eval MODEL --keep {spec} -o {folder}`"
        )
    return record


def _same_measure(records: dict[str, KeepNLL]) -> None:
    """Refuse keep NLLs measured in different dtypes or prompt formats: their differences are what Retention is."""
    t = records["target"]
    for name, r in records.items():
        if (r.dtype, r.chat) != (t.dtype, t.chat):
            raise SurgeryError(
                f"the keep NLL of {name} was measured with dtype={r.dtype}, chat={r.chat} but the target's with "
                f"dtype={t.dtype}, chat={t.chat}; measure all three alike (eval's --dtype and --no-chat)"
            )


def report(
    source: str | Path, target: str | Path, patched: list[str | Path], samples: int = 2000, keep: str | None = None
) -> Report:
    """Compute TIR and Recovery (with paired bootstrap 95% intervals) for each patched result.

    Args:
        source, target: results folders of the baselines.
        patched: results folders of patched models.
        samples: bootstrap resamples.
        keep: a keep set (as `eval --keep` was given it): each folder's keep NLL on it gives each patched
            result its Retention (`metrics.retention`), or where the target has no advantage on it, the keep
            NLL change.

    Returns:
        The baselines and a row per patched result; undefined metrics are None with a reason.

    Raises:
        SurgeryError: the results are of different benchmarks, subsets or settings; with `keep`, a folder has
            no keep file for it (or one of other rows, or of another model), or they were measured differently.
    """
    (s_sum, s_rec, s_nll), (t_sum, t_rec, t_nll) = _load(source), _load(target)
    if keep is not None:
        s_keep, t_keep = _keep_of(source, s_sum, keep), _keep_of(target, t_sum, keep)
    ids = list(t_rec)
    key = ("benchmark", "benchmark_sha256", "problem_ids_sha256", "shots", "chat", "max_new_tokens", "prompt")

    def setting(summary: dict, k: str) -> object:
        # Summaries written before the prompt style was recorded used surgery's.
        return summary["settings"].get(k, "surgery" if k == "prompt" else None)

    rows = []
    for folder in patched:
        p_sum, p_rec, p_nll = _load(folder)
        for name, other in (("source", s_sum), ("patched " + str(folder), p_sum)):
            for k in key:
                if setting(other, k) != setting(t_sum, k):
                    raise SurgeryError(
                        f"{name} was evaluated with {k}={setting(other, k)!r} but the target with "
                        f"{setting(t_sum, k)!r}; compare results of the same benchmark, subset and settings"
                    )
        if set(p_rec) != set(ids) or set(s_rec) != set(ids):
            raise SurgeryError("the results cover different problems; evaluate all three on the same subset")
        kept = {}
        if keep is not None:
            p_keep = _keep_of(folder, p_sum, keep)
            _same_measure({"source": s_keep, "target": t_keep, "patched " + str(folder): p_keep})
            kept = {"keep_nll": p_keep.mean, "retention": retention(s_keep.nll, t_keep.nll, p_keep.nll, samples)}
        s, t, p = s_sum["accuracy"], t_sum["accuracy"], p_sum["accuracy"]
        intervals = paired_bootstrap([s_rec[i] for i in ids], [t_rec[i] for i in ids], [p_rec[i] for i in ids], samples)
        rows.append(
            ReportRow(
                patched=str(folder),
                accuracy=p,
                accuracy_ci95=p_sum["accuracy_ci95"],
                tir=tir(p, t),
                tir_ci95=intervals["tir"],
                tir_undefined=None if t > 0 else "target accuracy is 0",
                recovery_pct=recovery(p, t, s),
                recovery_ci95=intervals["recovery"],
                recovery_undefined=None if s != t else "source and target accuracies are equal (no gap)",
                **_nll_row(s_nll, t_nll, p_nll, samples),
                **kept,
            )
        )
    return Report(
        t_sum["benchmark"],
        len(ids),
        Baseline(str(source), s_sum["accuracy"], s_sum["accuracy_ci95"], s_sum.get("nll_mean")),
        Baseline(str(target), t_sum["accuracy"], t_sum["accuracy_ci95"], t_sum.get("nll_mean")),
        tuple(rows),
        KeepSet(t_keep.workload, t_keep.sha256, t_keep.rows, s_keep.mean, t_keep.mean) if keep is not None else None,
    )


def markdown(result: Report) -> str:
    """The report as a markdown table."""

    def pct(x: float, ci: Interval | None = None) -> str:
        return f"{100 * x:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    def metric(value: float | None, ci, why: str | None, fmt: str) -> str:
        if value is None:
            return f"undefined ({why})"
        return format(value, fmt) + (f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]" if ci else "")

    def nll(value: float | None) -> str:
        return "" if value is None else f" (gold NLL {value:.4f})"

    s, t, k = result.source, result.target, result.keep
    keep_set = (
        f" Keep set {k.workload} ({k.rows} rows): keep NLL source {k.source_nll:.4f}, target {k.target_nll:.4f}."
        if k
        else ""
    )
    lines = [
        f"{result.benchmark}, {result.problems} problems. "
        f"Source {pct(s.accuracy, s.accuracy_ci95)}{nll(s.nll)}, "
        f"target {pct(t.accuracy, t.accuracy_ci95)}{nll(t.nll)}.{keep_set}",
        "",
        "| patched | accuracy [95% CI] | TIR [95% CI] | Recovery % [95% CI] | gold NLL | NLL Recovery % [95% CI] |"
        + (f" keep {k.workload} [95% CI] |" if k else ""),
        "|---|---|---|---|---|---|" + ("---|" if k else ""),
    ]
    for r in result.rows:
        lines.append(
            f"| {r.patched} | {pct(r.accuracy, r.accuracy_ci95)} "
            f"| {metric(r.tir, r.tir_ci95, r.tir_undefined, '.2f')} "
            f"| {metric(r.recovery_pct, r.recovery_ci95, r.recovery_undefined, '.1f')} "
            f"| {'-' if r.nll is None else format(r.nll, '.4f')} "
            f"| {metric(r.nll_recovery_pct, r.nll_recovery_ci95, r.nll_undefined, '.1f')} |"
            + (f" {describe(r.retention)} |" if r.retention else "")
        )
    return "\n".join(lines)


def save_report(result: Report, path: str | Path) -> None:
    write_json_atomic(Path(path), result.to_dict())
