"""The ranking-method registry: one decorated scoring function per method, keyed by name.

A method declares what it needs (`stats`: a profile of both models; `seed`: a seed; `gold`: a
workload with gold solutions, to measure the task loss on the target), and one
check here refuses a missing need with the same message for every method. A method may also take a
keep workload (`takes_keep`): what the target must not lose, traded against the task in each score
(`KeepScore`); the same check refuses one given to a method that cannot use it. It declares the
parameters its manifest records as a frozen dataclass (`params.py`). Adding a method is one file in
this folder with one `@ranking_method` function, plus its import in `__init__.py`; the manifest
schema's enum is generated from the registry (`schema.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

from surgery.analysis.ranking.params import NoParams
from surgery.checkpoints.options import ModelOptions
from surgery.errors import SurgeryError

if TYPE_CHECKING:  # torch comes with Stats; the CLI lists method names without paying for it
    from surgery.analysis.stats import Stats
    from surgery.analysis.workloads import PromptSet
    from surgery.checkpoints.candidates import Candidate, Compatibility
    from surgery.checkpoints.folder import Checkpoint

Need = Literal["stats", "seed", "gold"]
P = TypeVar("P")
# How to satisfy each need, on the command line and in the Python API.
_NEED_HINTS: dict[str, str] = {
    "stats": "--source-stats and --target-stats",
    "seed": "--seed",
    "gold": "--workload with gold solutions (gsm8k-train:N, math-train:N, or a JSONL with prompt and solution)",
}


@dataclass(frozen=True, kw_only=True)
class RankContext(Generic[P]):
    """Everything a scoring function may read. Fields a method does not declare in `needs` may be None.

    Attributes:
        source, target: the checkpoints (memory-mapped through their headers, never loaded whole).
        compat: the candidate modules of the pair; `names` lists them in module order.
        params: the method's declared parameters (`params=`), as its manifest records them.
        src_stats, tgt_stats: profile statistics of both models (`needs={"stats"}`), already
            checked to be comparable and to belong to these checkpoints.
        workload: prompts with gold solutions (`needs={"gold"}`).
        options: how to load and prompt the target (`needs={"gold"}`).
        batch_size: problems per forward pass (`needs={"gold"}`).
        only: score only these candidates (None: all); the others are listed as excluded.
        keep: what the target must not lose, with solutions (methods with `takes_keep` only; None: the
            task alone). Such a method scores each module as a `KeepScore`.
    """

    source: Checkpoint
    target: Checkpoint
    compat: Compatibility
    params: P
    src_stats: Stats | None = None
    tgt_stats: Stats | None = None
    workload: PromptSet | None = None
    options: ModelOptions = field(default_factory=ModelOptions)
    batch_size: int = 8
    only: frozenset[str] | None = None
    keep: PromptSet | None = None

    @property
    def candidates(self) -> list[Candidate]:
        """The candidates to score, in module order."""
        return [c for c in self.compat.candidates if self.only is None or c.name in self.only]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.candidates]


@dataclass(frozen=True)
class KeepScore:
    """A module's score traded against the keep workload: what restoring it gains on the task, less what
    it costs on the keep workload. The manifest records both parts beside the score, so that a first-order
    estimate (`taylor`) can be compared with the measured swap (`swap-nll`) part by part.

    Attributes:
        task_gain: the drop of the task NLL when the module is restored (nats per token).
        keep_loss: the rise of the keep workload's NLL when it is restored (negative: restoring helps it too).
    """

    task_gain: float
    keep_loss: float

    @property
    def score(self) -> float:
        return self.task_gain - self.keep_loss


# A scorer returns a float per module, or a `KeepScore` per module when it was given a keep workload.
Scorer = Callable[[RankContext], dict[str, float] | dict[str, KeepScore]]


@dataclass(frozen=True)
class RankingMethod:
    """A registered method: its name (as written in manifests), scorer, needs, parameters and one-line summary.

    `baseline`: the chance ranking that `sweep` evaluates beside the manifest's (exactly one method is).
    `takes_keep`: it can trade the task against a keep workload (`RankContext.keep`).
    """

    name: str
    score: Scorer
    needs: frozenset[Need]
    params: type
    summary: str
    reference: str | None = None
    baseline: bool = False
    takes_keep: bool = False


RANKING_METHODS: dict[str, RankingMethod] = {}


def ranking_method(
    name: str,
    *,
    needs: tuple[Need, ...] = (),
    params: type = NoParams,
    reference: str | None = None,
    baseline: bool = False,
    takes_keep: bool = False,
) -> Callable[[Scorer], Scorer]:
    """Register `score(ctx) -> {module: score}` (higher = transplant first) under `name`.

    Args:
        name: the method's name, as `--method` takes it and manifests record it.
        needs: what it reads from the request; a missing one is refused before any work starts.
        params: a frozen dataclass (`params.py`) whose fields `build_manifest` fills from the request
            values of the same names; the manifest records it as `method.params`.
        reference: where the method comes from, if published.
        baseline: the chance ranking `sweep` compares against (one method only).
        takes_keep: it accepts a keep workload and then returns a `KeepScore` per module.

    Returns:
        The decorator; the function's docstring's first line is the method's summary (shown by `--help`).

    Raises:
        ValueError: `name` is registered already, or a second baseline is declared.
    """

    def register(score: Scorer) -> Scorer:
        if name in RANKING_METHODS:
            raise ValueError(f"ranking method {name!r} is registered twice; give the new one another name")
        if baseline and any(m.baseline for m in RANKING_METHODS.values()):
            raise ValueError(f"ranking method {name!r} is a second baseline; sweep compares against one")
        summary = (score.__doc__ or "").strip().splitlines()[0] if score.__doc__ else name
        RANKING_METHODS[name] = RankingMethod(
            name,
            score,
            frozenset(needs),
            params,
            summary,
            reference=reference,
            baseline=baseline,
            takes_keep=takes_keep,
        )
        return score

    return register


def get_method(name: str) -> RankingMethod:
    """The registered method `name`.

    Raises:
        SurgeryError: no such method; the message lists the registered ones.
    """
    if name not in RANKING_METHODS:
        raise SurgeryError(f"unknown method {name!r}; use one of {', '.join(RANKING_METHODS)}")
    return RANKING_METHODS[name]


def baseline_method() -> RankingMethod:
    """The chance ranking (`baseline=True`) that `sweep` evaluates beside a manifest's."""
    return next(m for m in RANKING_METHODS.values() if m.baseline)


def methods_that_need(need: Need) -> list[str]:
    """The names of the registered methods that declare `need`, in registration order."""
    return [m.name for m in RANKING_METHODS.values() if need in m.needs]


def methods_taking_keep() -> list[str]:
    """The names of the registered methods that take a keep workload, in registration order."""
    return [m.name for m in RANKING_METHODS.values() if m.takes_keep]


def check_needs(
    method: RankingMethod, *, have_stats: bool, seed: int | None, have_gold: bool = False, have_keep: bool = False
) -> None:
    """Refuse a request that lacks what `method` needs, or gives it a keep workload it cannot use, before any
    slow work starts."""
    # A keep workload the method cannot use is refused first: the needs below would not make it usable.
    if have_keep and not method.takes_keep:
        raise SurgeryError(
            f"method {method.name} cannot use --keep; use --method {' or '.join(methods_taking_keep())}, "
            "which trade the task against the keep workload"
        )
    have = {"stats": have_stats, "seed": seed is not None, "gold": have_gold}
    missing = next((n for n in sorted(method.needs) if not have[n]), None)
    if missing is not None:
        raise SurgeryError(f"method {method.name} needs {_NEED_HINTS[missing]}")
