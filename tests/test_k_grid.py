"""The K values of sweep, select and analyze --auto-k: one default grid, one parser (issue 26 item 4)."""

from __future__ import annotations

import pytest

from surgery import SurgeryError
from surgery.evaluation.k_grid import DEFAULT_KS, SWEEP_SMALLEST_K, parse_ints, parse_ks


def test_the_default_grid_is_cut_to_the_manifest_and_ends_at_its_size() -> None:
    assert parse_ks(None, 200) == list(DEFAULT_KS)
    assert parse_ks(None, 14) == [1, 2, 4, 8, 14]
    assert parse_ks(None, 3) == [1, 2, 3]
    # sweep's starts at 8: each of its K is a full evaluation per ranking and budget.
    assert parse_ks(None, 200, SWEEP_SMALLEST_K) == [8, 16, 32, 64, 128]
    assert parse_ks(None, 14, SWEEP_SMALLEST_K) == [8, 14]


def test_given_ks_are_sorted_without_repeats_and_checked() -> None:
    assert parse_ks("4, 1,4,2,", 14) == [1, 2, 4]
    for text, message in (
        ("8,x", "--ks '8,x' is not a comma-separated list of integers, e.g. 1,2,4,8"),
        ("0,2", "--ks '0,2' must list K values of at least 1, e.g. 1,2,4,8"),
        ("", "--ks '' must list K values of at least 1"),
        ("99", "--ks 99 is more than the manifest's 14 modules; list K up to 14"),
    ):
        with pytest.raises(SurgeryError) as e:
            parse_ks(text, 14)
        assert str(e.value).startswith(message)


def test_budgets_use_the_same_parser() -> None:
    assert parse_ints("128,64", "--max-new-tokens") == [64, 128]
    with pytest.raises(SurgeryError, match=r"^--max-new-tokens '0' must list values of at least 1"):
        parse_ints("0", "--max-new-tokens")
