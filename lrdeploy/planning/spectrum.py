"""Truncated SVD of a weight matrix, through the Gram matrix of its smaller side.

For M (m×n, m ≤ n) let G = M Mᵀ = U diag(σ²) Uᵀ (symmetric eigendecomposition, float64). Then

    M_r = U_r U_rᵀ M = A B,   A = U_r diag(√σ_r)  (m×r),   B = diag(1/√σ_r) U_rᵀ M  (r×n)

is the best rank-r approximation (Eckart–Young): ‖M − M_r‖_F² = Σ_{i>r} σ_i², so the relative error is
√(Σ_{i>r} σ_i² / Σ_i σ_i²) = √(1 − energy kept). For m > n the same holds with G = MᵀM on the right.
Splitting √σ to each side keeps both factors at the same scale (friendlier to fp16 and quantization).

Why Gram + eigh: an m×m eigendecomposition costs O(m²n + m³) against LAPACK SVD's larger constant; on the
54 weights of ResNet-50 it takes 0.9 s against 6.6 s for ``numpy.linalg.svd(full_matrices=False)``
(2-core machine, see benchmarks/). Squaring loses accuracy only below σ/σ_max ≈ 1e-8, far under float32
weight precision; directions that small are dropped from the factors rather than divided by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Spectrum"]

#: Singular values below this fraction of the largest carry no float32 information.
_RELATIVE_FLOOR = 1e-7


def _gram(matrix: np.ndarray) -> np.ndarray:
    """M Mᵀ or MᵀM, whichever is smaller, in float64."""
    work = np.asarray(matrix, dtype=np.float64)
    return work @ work.T if work.shape[0] <= work.shape[1] else work.T @ work


@dataclass
class Spectrum:
    """Singular values of one m×n matrix, with the eigenbasis of its smaller side kept for factoring."""

    m: int
    n: int
    singular_values: np.ndarray  # descending, float64
    _basis: np.ndarray | None  # columns: left (m ≤ n) or right (m > n) singular vectors

    @classmethod
    def of(cls, matrix: np.ndarray) -> Spectrum:
        m, n = matrix.shape
        eigenvalues, basis = np.linalg.eigh(_gram(matrix))
        order = np.argsort(eigenvalues)[::-1]
        singular = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
        return cls(m, n, singular, basis[:, order])

    @classmethod
    def values_of(cls, matrix: np.ndarray) -> Spectrum:
        """The singular values alone, basis never formed (what a budget's allocation reads).

        LAPACK's values-only path (tridiagonal QR, no eigenvectors) takes 0.56 s on a 1600² Gram
        against 1.33 s for ``eigh`` (one thread, 2-core container); the values agree with ``of``'s to
        ~1e-15 of the largest. `factors` then needs ``of``: the weight is decomposed again at its rank.
        """
        m, n = matrix.shape
        eigenvalues = np.sort(np.linalg.eigvalsh(_gram(matrix)))[::-1]
        return cls(m, n, np.sqrt(np.clip(eigenvalues, 0.0, None)), None)

    @property
    def full_rank(self) -> int:
        return min(self.m, self.n)

    @property
    def energy(self) -> np.ndarray:
        """energy[r-1] = fraction of Σσ² kept by the first r singular values."""
        squares = self.singular_values**2
        total = squares.sum()
        if total == 0.0:
            return np.ones_like(squares)
        return np.cumsum(squares) / total

    def energy_kept(self, rank: int) -> float:
        return float(self.energy[rank - 1])

    def rank_for_energy(self, fraction: float) -> int:
        """Smallest r whose first r singular values hold at least ``fraction`` of Σσ²."""
        index = int(np.searchsorted(self.energy, fraction - 1e-12, side="left"))
        return min(index + 1, self.full_rank)

    def factors(self, matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) with A @ B the best rank-``rank`` approximation of ``matrix``; A is m×r, B is r×n."""
        if self._basis is None:
            raise ValueError("the basis of this spectrum was released")
        work = np.asarray(matrix, dtype=np.float64)
        sigma = self.singular_values[:rank]
        usable = sigma > _RELATIVE_FLOOR * max(self.singular_values[0], np.finfo(float).tiny)
        root = np.sqrt(sigma)
        inverse_root = np.divide(1.0, root, out=np.zeros_like(root), where=usable)
        basis = self._basis[:, :rank]
        if self.m <= self.n:
            a = basis * np.where(usable, root, 0.0)
            b = inverse_root[:, None] * (basis.T @ work)
        else:
            a = (work @ basis) * inverse_root
            b = np.where(usable, root, 0.0)[:, None] * basis.T
        return a, b

    def release(self) -> None:
        """Drop the basis (min(m, n)² floats) once the factors are computed."""
        self._basis = None
