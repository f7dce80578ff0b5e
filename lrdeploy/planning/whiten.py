"""Data-aware ("whitened") truncation: the rank-r factors that minimize the layer's output error.

For a layer y = W x (W m×n) and calibration rows X (N×n, one input per row) with second moment
C = XᵀX / N, the output error of an approximation AB is

    ‖(W − AB) Xᵀ‖_F² / N = tr((W − AB) C (W − AB)ᵀ) = ‖(W − AB) S‖_F²   for any S with S Sᵀ = C.

With S invertible, Eckart–Young applied to W S gives the minimizer: W S = U Σ Vᵀ, AB = U_r Σ_r V_rᵀ S⁻¹
(the whitening of SVD-LLM). S comes from the eigendecomposition C = Q Λ Qᵀ, never a Cholesky (C is
often singular: fewer rows than n, dead inputs): eigenvalues are floored at ``floor``·λ_max and may be
damped by ``damping``·mean(λ), giving Λ̃ > 0 and S = Q Λ̃^{1/2}, S⁻¹ = Λ̃^{-1/2} Qᵀ. Because S is
invertible, the full-rank factors reproduce W exactly whatever C is; the floor only decides how much
the truncation cares about directions the calibration rows barely visit (too little, and those
directions of W are amplified on new inputs: see FIELD-NOTES.md).

The error of every rank comes from the components without refitting: A's columns are orthogonal
(they are U's), so tr(E C Eᵀ) for E = Σ_{i>r} a_i b_iᵀ is Σ_{i>r} ‖a_i‖² b_iᵀ C b_i. Normalized by
tr(W C Wᵀ) this is the relative output error on the calibration rows, measured on C itself (not on the
floored C̃), so it is exact for the allocator. The same identity gives plain SVD's output error per rank.

Factors are returned as `lrdeploy.planning.spectrum.Spectrum.factors` returns them (A m×r, B r×n, A @ B ≈ W),
balanced: each component scaled so that ‖a_i‖ = ‖b_i‖, as plain SVD's √σ split does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrdeploy.planning.spectrum import Spectrum

__all__ = ["Factors", "WhitenedSpectrum", "choose_factors", "component_errors", "holdout_error"]

#: Default relative eigenvalue floor of the calibration second moment (λ_i ≥ floor · λ_max).
FLOOR = 1e-6


def _balanced(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale each component so that ‖a_i‖ = ‖b_i‖; zero components stay zero."""
    norm_a, norm_b = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1)
    usable = (norm_a > 0) & (norm_b > 0)
    scale = np.sqrt(np.divide(norm_b, norm_a, out=np.ones_like(norm_a), where=usable))
    return a * scale, b / scale[:, None]


def component_errors(a: np.ndarray, b: np.ndarray, second_moment: np.ndarray) -> np.ndarray:
    """errors[r] = relative output error on C of the first r components (r = 0 … k), for factors whose
    A columns are orthogonal (plain SVD's and whitened factors both are)."""
    weights = np.sum(a * a, axis=0) * np.sum((b @ second_moment) * b, axis=1)  # bᵢᵀ C bᵢ, on BLAS
    weights = np.clip(weights, 0.0, None)
    tail = np.concatenate([np.cumsum(weights[::-1])[::-1], [0.0]])
    total = tail[0]
    return tail / total if total > 0 else np.zeros_like(tail)


def holdout_error(weight: np.ndarray, a: np.ndarray, b: np.ndarray, second_moment: np.ndarray) -> float:
    """‖(W − AB) X_h‖² / ‖W X_h‖² from the second moment of rows X_h (0 when W X_h is 0)."""
    w = np.asarray(weight, dtype=np.float64)
    error = w - np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64)
    total = float(np.sum((w @ second_moment) * w))
    if total <= 0:
        return 0.0
    return max(0.0, float(np.sum((error @ second_moment) * error))) / total


def _eigh(moment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C = Q Λ Qᵀ; a diagonal C (an embedding's token counts) is its own eigendecomposition."""
    diagonal = np.diag(moment).copy()
    if np.count_nonzero(moment) == np.count_nonzero(diagonal):
        return diagonal, np.eye(len(diagonal))
    return np.linalg.eigh((moment + moment.T) / 2)


@dataclass
class WhitenedSpectrum:
    """Whitened singular values of one m×n weight for one calibration second moment, with its factors."""

    singular_values: np.ndarray  # of W S, descending
    errors: np.ndarray  # errors[r]: relative output error on the calibration rows at rank r
    floored: int  # eigenvalues of C lifted by the floor (C's deficiency as the factorization sees it)
    _a: np.ndarray
    _b: np.ndarray

    @classmethod
    def of(
        cls, weight: np.ndarray, second_moment: np.ndarray, floor: float = FLOOR, damping: float = 0.0
    ) -> WhitenedSpectrum:
        w = np.asarray(weight, dtype=np.float64)
        moment = np.asarray(second_moment, dtype=np.float64)
        n = w.shape[1]
        if moment.shape != (n, n):
            raise ValueError(f"second moment has shape {moment.shape}, expected ({n}, {n})")
        if not (np.isfinite(w).all() and np.isfinite(moment).all()):
            raise ValueError("weight or second moment holds NaN or infinite values")
        eigenvalues, basis = _eigh(moment)
        eigenvalues = np.clip(eigenvalues, 0.0, None)
        largest = float(eigenvalues.max(initial=0.0))
        if largest <= 0:  # the layer only ever saw zeros: any factors are exact on it; use plain SVD's
            lifted, floored = np.ones_like(eigenvalues), n
        else:
            lower = floor * largest
            floored = int(np.sum(eigenvalues < lower))
            lifted = np.maximum(eigenvalues, lower) + damping * float(eigenvalues.mean())
        root = np.sqrt(lifted)
        whitened = (w @ basis) * root  # W S in the eigenbasis: W Q Λ̃^{1/2}
        spectrum = Spectrum.of(whitened)
        a, b_white = spectrum.factors(whitened, spectrum.full_rank)
        b = (b_white / root) @ basis.T  # B S⁻¹ = B Λ̃^{-1/2} Qᵀ
        a, b = _balanced(a, b)
        errors = component_errors(a, b, moment) if largest > 0 else np.zeros(spectrum.full_rank + 1)
        return cls(spectrum.singular_values, errors, floored, a, b)

    @property
    def full_rank(self) -> int:
        return len(self.singular_values)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, B): A m×r, B r×n, minimizing the (floored) output error among rank-r products."""
        if not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank {rank} is outside 1..{self.full_rank}")
        return self._a[:, :rank].copy(), self._b[:rank].copy()


@dataclass(frozen=True)
class Factors:
    """The factors chosen for one layer at one rank, with both methods' errors (fit and held-apart rows)."""

    method: str  # "whiten" or "svd"
    a: np.ndarray
    b: np.ndarray
    fit_error: float
    holdout_error: float | None
    svd_fit_error: float
    svd_holdout_error: float | None
    reason: str | None = None  # why plain SVD was used although whitening was asked for


def choose_factors(
    weight: np.ndarray,
    rank: int,
    whitened: WhitenedSpectrum,
    plain: Spectrum,
    fit: np.ndarray,
    holdout: np.ndarray | None,
) -> Factors:
    """Whitened factors, unless plain SVD does better on the held-apart rows (then plain, with the reason).

    ``plain`` must still hold its basis (`Spectrum.release` not yet called).
    """
    a, b = whitened.factors(rank)
    pa, pb = plain.factors(weight, rank)
    svd_fit = holdout_error(weight, pa, pb, fit)
    white_fit = float(whitened.errors[rank])
    if holdout is None:
        return Factors("whiten", a, b, white_fit, None, svd_fit, None)
    white_held = holdout_error(weight, a, b, holdout)
    svd_held = holdout_error(weight, pa, pb, holdout)
    if white_held <= svd_held:
        return Factors("whiten", a, b, white_fit, white_held, svd_fit, svd_held)
    reason = (
        f"whitened factors did worse on the held-apart calibration rows "
        f"({white_held:.3g} vs {svd_held:.3g} relative output error)"
    )
    return Factors("svd", pa, pb, svd_fit, svd_held, svd_fit, svd_held, reason)
