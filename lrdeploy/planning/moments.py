"""Second-moment accumulators: Σ xxᵀ in float64 and the row count, with sums kept in cheaper orders
until read (tap-major conv Grams by shifts, upper block rows from onnxruntime) and folded once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrdeploy.planning.patchgram import add_gram, ordered

__all__ = ["LayerMoments", "SecondMoment", "check_finite"]


class SecondMoment:
    """Σ xxᵀ over rows x (float64) and how many rows; ``matrix`` is the mean, normalized by rows.

    Stride-1 convs add their Gram in tap-major order (`patchgram.add_conv_gram`), kept apart in
    ``taps``; Grams computed in the graph add only their upper block rows, kept apart in ``upper``
    (`gramgraph.fold`). Both are put into row order once, when ``total`` is first read.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._total: np.ndarray | None = None
        self._taps: np.ndarray | None = None
        self._upper: np.ndarray | None = None
        self._order: np.ndarray | None = None
        self._channels = 0

    def __repr__(self) -> str:
        return f"SecondMoment(dim={self.dim}, count={self.count})"

    @property
    def total(self) -> np.ndarray:
        """Σ xxᵀ, rows ordered as the layer's weight columns."""
        if self._taps is not None:
            taps, self._taps = self._taps, None
            if self._total is None:
                self._total = ordered(taps, self._channels)
            else:
                self._total += ordered(taps, self._channels)
        if self._total is None:
            self._total = _zeroed(self.dim)
        if self._upper is not None:
            upper, self._upper = self._upper, None
            full = np.triu(upper)
            full += np.triu(upper, 1).T
            self._total += full if self._order is None else full[np.ix_(self._order, self._order)]
        return self._total

    @total.setter
    def total(self, value: np.ndarray) -> None:
        _ = self.total  # fold pending sums in first
        self._total = value

    def taps(self, channels: int) -> np.ndarray:
        """The tap-major accumulator of `patchgram.add_conv_gram` for a conv of ``channels`` inputs."""
        if self._taps is None:
            self._taps, self._channels = _zeroed(self.dim), channels
        return self._taps

    def upper(self, order: np.ndarray | None = None) -> np.ndarray:
        """An accumulator of which only the upper triangle counts (mirrored when folded); its rows are
        ``order``'s (row i of the total is row order[i] of it), or the total's."""
        if self._upper is None:
            self._upper, self._order = _zeroed(self.dim), order
        return self._upper

    def update(self, rows: np.ndarray, checked: bool = False) -> None:
        """Add the rows (r × dim); raises ValueError on a wrong width or (unless ``checked``) non-finite
        values. float32 rows are multiplied in chunks of `patchgram.CHUNK` and summed in float64."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows of shape {rows.shape} for a second moment of width {self.dim}")
        if not checked:
            check_finite(rows, "rows")
        add_gram(rows, self.total)
        self.count += rows.shape[0]

    @property
    def matrix(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no rows were accumulated")
        return self.total / self.count


def _zeroed(dim: int) -> np.ndarray:
    """A d × d float64 zero accumulator written once, front to back. ``np.zeros`` maps untouched pages
    that the first ``+=`` reads and then copies on write (two faults, with TLB flushes, per page); on
    VMs that hand freed memory back to the host each fault is a host fault (~2-3 s per GB here)."""
    total = np.empty((dim, dim))
    total.fill(0.0)
    return total


def check_finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"the {what} hold NaN or infinite values")


@dataclass
class LayerMoments:
    """The second moments of one layer's input: rows the factors are fitted on, and rows held apart."""

    fit: SecondMoment
    holdout: SecondMoment
    samples_seen: int = 0
