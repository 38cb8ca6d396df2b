"""The K values (and blends) that `sweep`, `select` and `analyze --auto-k` measure: one default grid, one parser.

Torch-free, so that the CLI can show the defaults in `--help`.
"""

from __future__ import annotations

from surgery.checkpoints.streaming import check_alpha
from surgery.errors import SurgeryError

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
# sweep's default grid starts here: each of its K costs a full evaluation per ranking and decoding budget,
# where each of select's costs one teacher-forced pass over the validation problems.
SWEEP_SMALLEST_K = 8


def default_grid(smallest: int = 1) -> tuple[int, ...]:
    """`DEFAULT_KS` from `smallest` on."""
    return tuple(k for k in DEFAULT_KS if k >= smallest)


def clip_grid(grid: tuple[int, ...], modules: int) -> list[int]:
    """A default K grid cut to a manifest of `modules` modules, ending at min(modules, largest K)."""
    return sorted({k for k in grid if k < modules} | {min(modules, max(grid))})


def parse_ints(text: str, flag: str, noun: str = "values") -> list[int]:
    """The comma-separated integers of `flag` (each at least 1), sorted, without repeats.

    Raises:
        SurgeryError: not a list of integers, or a value below 1.
    """
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SurgeryError(f"{flag} {text!r} is not a comma-separated list of integers, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise SurgeryError(f"{flag} {text!r} must list {noun} of at least 1, e.g. 1,2,4,8")
    return sorted(set(values))


def parse_ks(text: str | None, modules: int, smallest: int = 1) -> list[int]:
    """The K values of `--ks`, sorted; each between 1 and `modules` (the manifest's).

    Args:
        text: comma-separated K values; None for the default grid from `smallest`, cut to `modules`
            (and including it).
        modules: how many modules the manifest ranks.
        smallest: where the default grid starts (`SWEEP_SMALLEST_K` for `sweep`).

    Returns:
        The K values, ascending.

    Raises:
        SurgeryError: not a list of integers, a value below 1, or one above `modules`.
    """
    if text is None:
        return clip_grid(default_grid(smallest), modules)
    values = parse_ints(text, "--ks", "K values")
    if values[-1] > modules:
        raise SurgeryError(f"--ks {values[-1]} is more than the manifest's {modules} modules; list K up to {modules}")
    return values


def parse_alphas(text: str | None) -> list[float]:
    """`--alphas`: comma-separated blends in (0, 1], each once, in the order given; None for [1.0].

    Raises:
        SurgeryError: a value that is not a number, or is outside (0, 1].
    """
    if text is None:
        return [1.0]
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise SurgeryError(f"--alphas {text!r}: {part!r} is not a number; pass e.g. 0.25,0.5,1") from None
        check_alpha(value, "--alphas")
        if value not in values:
            values.append(value)
    return values
