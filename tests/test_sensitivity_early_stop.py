"""benchmarks/sensitivity_early_stop.py's rule: stop a layer's sweep at the first negligible error."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from sensitivity_early_stop import stopped

CURVES = {"a": [(1, 0.5), (2, 1e-3), (4, 1e-7), (8, 1e-9)], "b": [(1, 0.2), (3, 0.1)]}


def test_stopped_gives_larger_ranks_the_first_negligible_error() -> None:
    curves, skipped = stopped(CURVES, 1e-6)
    assert curves["a"] == [(1, 0.5), (2, 1e-3), (4, 1e-7), (8, 1e-7)]
    assert curves["b"] == CURVES["b"] and skipped == 1


def test_stopped_changes_nothing_when_no_error_is_negligible() -> None:
    assert stopped(CURVES, 1e-12) == (CURVES, 0)
    curves, skipped = stopped(CURVES, 1.0)  # everything negligible: only the smallest rank is measured
    assert skipped == 3 + 1 and curves["a"] == [(r, 0.5) for r, _ in CURVES["a"]]
