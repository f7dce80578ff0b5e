"""Rank policies: frozen, validated configs with one job each, mapping a spectrum to a rank.

A policy only proposes a rank; `lrdeploy.planning.plan` applies the selection (include/exclude/overrides), the
rounding to a hardware multiple and the "does it save parameters" rule.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol

from lrdeploy.errors import UsageError
from lrdeploy.planning.spectrum import Spectrum

__all__ = ["Energy", "FixedRank", "RankPolicy", "RankRatio", "number", "round_half_up"]


def round_half_up(value: float) -> int:
    """Python's round() rounds 2.5 to 2; ranks round halves up so that ρ·min(m, n) is predictable."""
    return math.floor(value + 0.5)


def number(value: object, what: str) -> float:
    """A real number (numpy scalars included) as float; strings and bools are mistakes, said so."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


class RankPolicy(Protocol):
    def rank(self, spectrum: Spectrum) -> int: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class RankRatio:
    """r = max(1, round(ratio · min(m, n)))."""

    ratio: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", number(self.ratio, "rank ratio"))
        if not 0.0 < self.ratio <= 1.0:
            raise UsageError(f"rank ratio must be in (0, 1], got {self.ratio}; e.g. --rank-ratio 0.25")

    def rank(self, spectrum: Spectrum) -> int:
        return max(1, round_half_up(self.ratio * spectrum.full_rank))

    def describe(self) -> str:
        return f"rank ratio {self.ratio:g}"


@dataclass(frozen=True)
class Energy:
    """The smallest r whose singular values hold ``fraction`` of Σσ² (the squared Frobenius norm)."""

    fraction: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "fraction", number(self.fraction, "energy"))
        if not 0.0 < self.fraction <= 1.0:
            raise UsageError(f"energy must be in (0, 1], got {self.fraction}; e.g. --energy 0.95")

    def rank(self, spectrum: Spectrum) -> int:
        return spectrum.rank_for_energy(self.fraction)

    def describe(self) -> str:
        return f"energy {self.fraction:g}"


@dataclass(frozen=True)
class FixedRank:
    """The same rank for every layer (capped at each layer's full rank)."""

    value: int

    def __post_init__(self) -> None:
        if not (
            isinstance(self.value, numbers.Integral) and not isinstance(self.value, bool) and self.value >= 1
        ):
            raise UsageError(f"a rank must be a positive integer, got {self.value!r}")
        object.__setattr__(self, "value", int(self.value))

    def rank(self, spectrum: Spectrum) -> int:
        return min(self.value, spectrum.full_rank)

    def describe(self) -> str:
        return f"rank {self.value}"
