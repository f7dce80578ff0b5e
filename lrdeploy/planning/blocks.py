"""Spectra of a layer made of independent blocks (grouped convs, group low rank), as one layer.

A rank is a rank per block: every block is truncated at the same r, so the pair keeps two standard
grouped Conv nodes (`lrdeploy.passes.lowrank_grouped`). These classes answer what `Spectrum` and
`WhitenedSpectrum` answer for one matrix — energy or output error at rank r, factors at rank r — by
summing the blocks': the error of the whole layer is the sum of its blocks' (they touch disjoint
weights). Factors come back as A (m × G·r) and B (G·r × n) of the stored matrix, zero outside the
blocks, so A @ B is the approximation and `whiten.holdout_error` measures it on the full covariance.

Whitening uses each block's own input covariance: the diagonal block of the layer's second moment over
its im2col rows (the columns of the block). The cross-block terms are left out of the fit (the groups
are factorized on their own, as the paper does) but not out of the measured errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lrdeploy.passes.lowrank_grouped import block_slices
from lrdeploy.passes.lowrank_ops import WeightView
from lrdeploy.planning.spectrum import Spectrum
from lrdeploy.planning.whiten import WhitenedSpectrum, component_errors

__all__ = ["BlockSpectrum", "BlockWhitened", "spectrum_of", "whitened_of"]

Blocks = Sequence[tuple[slice, slice]]


def _expand(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], blocks: Blocks, shape: tuple[int, int], rank: int
):
    """Block factors (A_g m_b×r, B_g r×n_b) → A (m × G·r), B (G·r × n), zero outside the blocks."""
    m, n = shape
    a = np.zeros((m, len(blocks) * rank))
    b = np.zeros((len(blocks) * rank, n))
    for g, ((rows, cols), (a_g, b_g)) in enumerate(zip(blocks, parts, strict=True)):
        a[rows, g * rank : g * rank + a_g.shape[1]] = a_g
        b[g * rank : g * rank + b_g.shape[0], cols] = b_g
    return a, b


def _summed(curves: Sequence[np.ndarray], totals: Sequence[float]) -> np.ndarray:
    """errors[r] of the whole layer from each block's relative errors[r] and its total."""
    grand = float(sum(totals))
    if grand <= 0:
        return np.zeros_like(curves[0])
    return sum(curve * total for curve, total in zip(curves, totals, strict=True)) / grand  # type: ignore[return-value]


@dataclass
class BlockSpectrum:
    """Plain SVD per block (duck-typed `Spectrum`)."""

    parts: list[Spectrum]
    blocks: Blocks
    shape: tuple[int, int]

    @classmethod
    def of(cls, matrix: np.ndarray, blocks: Blocks) -> BlockSpectrum:
        return cls([Spectrum.of(matrix[rows, cols]) for rows, cols in blocks], blocks, matrix.shape)

    @property
    def m(self) -> int:
        """One block's rows (a rank is a rank per block)."""
        return self.parts[0].m

    @property
    def n(self) -> int:
        return self.parts[0].n

    @property
    def full_rank(self) -> int:
        return min(part.full_rank for part in self.parts)

    @property
    def singular_values(self) -> np.ndarray:
        """The blocks' singular values, sorted (for reports; a rank keeps the first r of *each*)."""
        return np.sort(np.concatenate([p.singular_values for p in self.parts]))[::-1]

    @property
    def energy(self) -> np.ndarray:
        squares = [p.singular_values[: self.full_rank] ** 2 for p in self.parts]
        total = float(sum(float(np.sum(p.singular_values**2)) for p in self.parts))
        if total == 0.0:
            return np.ones(self.full_rank)
        return np.cumsum(sum(squares), dtype=np.float64) / total

    energy_kept = Spectrum.energy_kept  # both read only ``energy`` and ``full_rank``
    rank_for_energy = Spectrum.rank_for_energy

    def factors(self, matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [
            p.factors(matrix[rows, cols], rank)
            for p, (rows, cols) in zip(self.parts, self.blocks, strict=True)
        ]
        return _expand(parts, self.blocks, self.shape, rank)

    def output_errors(self, matrix: np.ndarray, moment: np.ndarray) -> np.ndarray:
        """errors[r] on the calibration rows, per-block factors (what `whiten.component_errors` gives one
        matrix), each block measured on its diagonal block of ``moment``."""
        curves, totals = [], []
        for part, (rows, cols) in zip(self.parts, self.blocks, strict=True):
            block, cov = matrix[rows, cols], moment[cols, cols]
            a, b = part.factors(block, part.full_rank)
            curves.append(component_errors(a, b, cov)[: self.full_rank + 1])
            totals.append(float(np.einsum("ij,jk,ik->", block, cov, block)))
        return _summed(curves, totals)

    def release(self) -> None:
        for part in self.parts:
            part.release()


@dataclass
class BlockWhitened:
    """Whitened factors per block on its diagonal block of the covariance (duck-typed `WhitenedSpectrum`)."""

    parts: list[WhitenedSpectrum]
    blocks: Blocks
    shape: tuple[int, int]
    errors: np.ndarray
    floored: int

    @classmethod
    def of(cls, matrix: np.ndarray, moment: np.ndarray, blocks: Blocks) -> BlockWhitened:
        parts, totals = [], []
        for rows, cols in blocks:
            block, cov = matrix[rows, cols], moment[cols, cols]
            parts.append(WhitenedSpectrum.of(block, cov))
            totals.append(float(np.einsum("ij,jk,ik->", block, cov, block)))
        full = min(p.full_rank for p in parts)
        errors = _summed([p.errors[: full + 1] for p in parts], totals)
        return cls(parts, blocks, matrix.shape, errors, sum(p.floored for p in parts))

    @property
    def full_rank(self) -> int:
        return min(p.full_rank for p in self.parts)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return _expand([p.factors(rank) for p in self.parts], self.blocks, self.shape, rank)


def spectrum_of(view: WeightView, matrix: np.ndarray) -> Spectrum | BlockSpectrum:
    return BlockSpectrum.of(matrix, block_slices(view)) if view.blocks > 1 else Spectrum.of(matrix)


def whitened_of(view: WeightView, matrix: np.ndarray, moment: np.ndarray) -> WhitenedSpectrum | BlockWhitened:
    if view.blocks > 1:
        return BlockWhitened.of(matrix, moment, block_slices(view))
    return WhitenedSpectrum.of(matrix, moment)


def plain_error(matrix: np.ndarray) -> Callable[[int], float]:
    """Relative Frobenius error of the best rank-r approximation of the whole matrix (plain low rank)."""
    s2 = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False) ** 2
    total = float(s2.sum())
    return lambda rank: float(np.sqrt(s2[rank:].sum() / total)) if total > 0 else 0.0
