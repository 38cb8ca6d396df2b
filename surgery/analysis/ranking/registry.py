"""The ranking-method registry: one decorated scoring function per method, keyed by name.

A method declares what it needs (`stats`: a profile of both models; `seed`: a seed; `gold`: a
workload with gold solutions, to measure the task loss on the target), and one
check here refuses a missing need with the same message for every method. Adding a method is one
file in this folder with one `@ranking_method` function, plus its import in `__init__.py` and its
name in the manifest schema's enum (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from surgery.checkpoints.options import ModelOptions
from surgery.errors import SurgeryError

if TYPE_CHECKING:  # torch comes with Stats; the CLI lists method names without paying for it
    from surgery.analysis.stats import Stats
    from surgery.analysis.workloads import PromptSet
    from surgery.checkpoints.candidates import Candidate, Compatibility
    from surgery.checkpoints.folder import Checkpoint

Need = Literal["stats", "seed", "gold"]
# How to satisfy each need, on the command line and in the Python API.
_NEED_HINTS: dict[str, str] = {
    "stats": "--source-stats and --target-stats",
    "seed": "--seed",
    "gold": "--workload with gold solutions (gsm8k-train:N, math-train:N, or a JSONL with prompt and solution)",
}


@dataclass(frozen=True)
class RankContext:
    """Everything a scoring function may read. Fields a method does not declare in `needs` may be None.

    Attributes:
        source, target: the checkpoints (memory-mapped through their headers, never loaded whole).
        compat: the candidate modules of the pair; `names` lists them in module order.
        src_stats, tgt_stats: profile statistics of both models (`needs={"stats"}`), already
            checked to be comparable and to belong to these checkpoints.
        seed: the seed (`needs={"seed"}`).
        workload: prompts with gold solutions (`needs={"gold"}`).
        options: how to load and prompt the target (`needs={"gold"}`).
        batch_size: problems per forward pass (`needs={"gold"}`).
        only: score only these candidates (None: all); the others are listed as excluded.
    """

    source: Checkpoint
    target: Checkpoint
    compat: Compatibility
    src_stats: Stats | None = None
    tgt_stats: Stats | None = None
    seed: int | None = None
    workload: PromptSet | None = None
    options: ModelOptions = field(default_factory=ModelOptions)
    batch_size: int = 8
    only: frozenset[str] | None = None

    @property
    def candidates(self) -> list[Candidate]:
        """The candidates to score, in module order."""
        return [c for c in self.compat.candidates if self.only is None or c.name in self.only]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.candidates]


Scorer = Callable[[RankContext], dict[str, float]]


@dataclass(frozen=True)
class RankingMethod:
    """A registered method: its name (as written in manifests), scorer, needs and one-line summary."""

    name: str
    score: Scorer
    needs: frozenset[Need]
    summary: str
    reference: str | None = None


RANKING_METHODS: dict[str, RankingMethod] = {}


def ranking_method(
    name: str, *, needs: tuple[Need, ...] = (), reference: str | None = None
) -> Callable[[Scorer], Scorer]:
    """Register `score(ctx) -> {module: score}` (higher = transplant first) under `name`.

    The function's docstring's first line is the method's summary (shown by `--help`).
    """

    def register(score: Scorer) -> Scorer:
        if name in RANKING_METHODS:
            raise ValueError(f"ranking method {name!r} is registered twice; give the new one another name")
        summary = (score.__doc__ or "").strip().splitlines()[0] if score.__doc__ else name
        RANKING_METHODS[name] = RankingMethod(name, score, frozenset(needs), summary, reference)
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


def check_needs(method: RankingMethod, *, have_stats: bool, seed: int | None, have_gold: bool = False) -> None:
    """Refuse a request that lacks what `method` needs, before any slow work starts."""
    have = {"stats": have_stats, "seed": seed is not None, "gold": have_gold}
    missing = next((n for n in sorted(method.needs) if not have[n]), None)
    if missing is not None:
        raise SurgeryError(f"method {method.name} needs {_NEED_HINTS[missing]}")
