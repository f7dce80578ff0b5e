"""Whitened truncation without ONNX: exact at full rank, never worse than plain SVD on the fit rows, the
per-rank errors equal to the directly computed ones, singular second moments, the held-apart fallback."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrdeploy.planning.spectrum import Spectrum
from lrdeploy.planning.whiten import WhitenedSpectrum, choose_factors, component_errors, holdout_error


def _case(seed: int, m: int, n: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A weight and calibration rows with correlated, unevenly scaled features (like activations)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((m, n))
    mixing = rng.standard_normal((n, n)) * np.logspace(0, -2, n)
    return weight, rng.standard_normal((rows, n)) @ mixing + 0.3


def _direct_error(weight: np.ndarray, a: np.ndarray, b: np.ndarray, x: np.ndarray) -> float:
    """‖(W − AB) Xᵀ‖² / ‖W Xᵀ‖² from the rows themselves."""
    return float(np.linalg.norm((weight - a @ b) @ x.T) ** 2 / np.linalg.norm(weight @ x.T) ** 2)


def _fitted(case: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray, WhitenedSpectrum]:
    m, n, rows, seed = case
    weight, x = _case(seed, m, n, rows)
    return weight, x, WhitenedSpectrum.of(weight, x.T @ x / rows)


cases = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 40), st.integers(0, 2**16))


@settings(max_examples=60)
@given(cases)
def test_full_rank_reproduces_the_weight(case):
    weight, _, whitened = _fitted(case)
    a, b = whitened.factors(whitened.full_rank)
    m, n = weight.shape
    assert a.shape == (m, min(m, n)) and b.shape == (min(m, n), n)
    np.testing.assert_allclose(a @ b, weight, rtol=0, atol=1e-6 * np.abs(weight).max())


@settings(max_examples=60)
@given(cases)
def test_errors_per_rank_equal_the_direct_error_on_the_rows(case):
    """errors[r] is measured on C itself, also where the floor lifted C's null space (rows < n)."""
    weight, x, whitened = _fitted(case)
    assert np.isfinite(whitened.errors).all() and whitened.errors[0] == pytest.approx(1.0)
    for rank in range(1, whitened.full_rank + 1):
        a, b = whitened.factors(rank)
        assert np.isfinite(a).all() and np.isfinite(b).all()
        assert whitened.errors[rank] == pytest.approx(_direct_error(weight, a, b, x), abs=1e-9)


@settings(max_examples=60)
@given(cases)
def test_whitened_is_not_worse_than_plain_svd_on_the_fit_rows(case):
    weight, x, whitened = _fitted(case)
    plain = Spectrum.of(weight)
    for rank in range(1, whitened.full_rank + 1):
        svd_error = _direct_error(weight, *plain.factors(weight, rank), x)
        assert whitened.errors[rank] <= svd_error * 1.01 + 1e-12


def test_whitening_gains_much_where_inputs_are_anisotropic():
    weight, x = _case(0, 32, 48, 500)
    whitened = WhitenedSpectrum.of(weight, x.T @ x / len(x))
    a, b = Spectrum.of(weight).factors(weight, 8)
    assert whitened.errors[8] < 0.6 * _direct_error(weight, a, b, x)


def test_plain_svd_output_errors_from_components():
    weight, x = _case(1, 10, 7, 30)
    plain = Spectrum.of(weight)
    a, b = plain.factors(weight, plain.full_rank)
    errors = component_errors(a, b, x.T @ x / len(x))
    for rank in range(1, plain.full_rank + 1):
        assert errors[rank] == pytest.approx(_direct_error(weight, a[:, :rank], b[:rank], x), abs=1e-9)


def test_factors_are_balanced():
    weight, x = _case(2, 9, 14, 50)
    a, b = WhitenedSpectrum.of(weight, x.T @ x / len(x)).factors(5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-9)


def test_singular_and_zero_second_moments_give_finite_factors():
    weight, x = _case(3, 6, 20, 3)  # 3 rows for 20 inputs
    whitened = WhitenedSpectrum.of(weight, x.T @ x / 3)
    assert whitened.floored >= 17
    assert all(np.isfinite(f).all() for f in whitened.factors(2))
    dead = WhitenedSpectrum.of(weight, np.zeros((20, 20)))
    assert dead.floored == 20 and not dead.errors.any()
    a, b = dead.factors(dead.full_rank)
    np.testing.assert_allclose(a @ b, weight, atol=1e-9)


def test_bad_second_moments_are_refused():
    weight = np.ones((3, 4))
    with pytest.raises(ValueError, match="shape"):
        WhitenedSpectrum.of(weight, np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        WhitenedSpectrum.of(weight, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="outside"):
        WhitenedSpectrum.of(weight, np.eye(4)).factors(4)


def test_holdout_error_matches_the_rows():
    weight, x = _case(4, 5, 8, 40)
    a, b = Spectrum.of(weight).factors(weight, 2)
    assert holdout_error(weight, a, b, x.T @ x / 40) == pytest.approx(_direct_error(weight, a, b, x))
    assert holdout_error(weight, a, b, np.zeros((8, 8))) == 0.0


def test_whitened_factors_are_chosen_when_they_generalize():
    weight, x = _case(5, 16, 24, 400)
    fit, held = x[:300], x[300:]
    whitened = WhitenedSpectrum.of(weight, fit.T @ fit / 300)
    chosen = choose_factors(weight, 6, whitened, Spectrum.of(weight), fit.T @ fit / 300, held.T @ held / 100)
    assert chosen.method == "whiten" and chosen.reason is None
    assert chosen.holdout_error == pytest.approx(_direct_error(weight, chosen.a, chosen.b, held))
    assert chosen.holdout_error < chosen.svd_holdout_error
    assert chosen.fit_error < chosen.svd_fit_error


def test_plain_svd_is_kept_where_whitening_overfits():
    """Fit rows that only visit half the inputs; held-apart rows that visit the other half."""
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((8, 12))
    fit = np.zeros((50, 12))
    fit[:, :6] = rng.standard_normal((50, 6))
    held = rng.standard_normal((50, 12))
    whitened = WhitenedSpectrum.of(weight, fit.T @ fit / 50)
    chosen = choose_factors(weight, 4, whitened, Spectrum.of(weight), fit.T @ fit / 50, held.T @ held / 50)
    assert chosen.method == "svd"
    assert "held-apart" in chosen.reason
    assert chosen.holdout_error == chosen.svd_holdout_error
