"""The parameters a ranking method records in its manifest (`method.params`), one frozen dataclass each.

A method declares its class (`@ranking_method(..., params=SeedParams)`); `build_manifest` fills each
field from the request value of the same name (`settings`: the stats' profile settings; `seed`;
`dtype` and `chat`: the target's `ModelOptions`; `keep`: the keep workload) and records `asdict(params)`,
leaving out the fields that are None (a request that did not use them). Methods that record the
same things share a class; a method that records something new adds its own class here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch comes with the stats module; the registry is imported without it
    from surgery.analysis.stats import ProfileSettings


@dataclass(frozen=True)
class NoParams:
    """Nothing to record (`weight-delta`): the weights alone decide the ranking."""


@dataclass(frozen=True)
class StatsParams:
    """The activation methods: the settings both profiles were measured with."""

    settings: ProfileSettings


@dataclass(frozen=True)
class SeedParams:
    """The seeded shuffles (`random`, `random-changed`): the seed."""

    seed: int


@dataclass(frozen=True)
class KeepRef:
    """The keep workload a ranking traded the task against: its name and the sha256 of its rows."""

    name: str
    sha256: str


@dataclass(frozen=True)
class GoldParams:
    """The task-loss methods (`taylor`, `swap-nll`): how the target was loaded and prompted, and the keep
    workload each score was traded against (None, not recorded: the task alone, as before keep sets)."""

    dtype: str
    chat: bool
    keep: KeepRef | None = None
