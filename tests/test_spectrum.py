"""The SVD math without ONNX: reconstruction, Eckart–Young, energy, rank deficiency, tall and wide."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrdeploy.planning.policy import Energy, FixedRank, RankRatio, round_half_up
from lrdeploy.planning.spectrum import Spectrum


def _matrix(seed: int, m: int, n: int, rank: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if rank is None:
        return rng.standard_normal((m, n)).astype(np.float32)
    return (rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))).astype(np.float32)


shapes = st.tuples(st.integers(1, 24), st.integers(1, 24), st.integers(0, 2**16))


@settings(max_examples=40)
@given(shapes)
def test_full_rank_reconstructs_the_matrix(shape):
    m, n, seed = shape
    matrix = _matrix(seed, m, n)
    spectrum = Spectrum.of(matrix)
    a, b = spectrum.factors(matrix, spectrum.full_rank)
    assert a.shape == (m, spectrum.full_rank) and b.shape == (spectrum.full_rank, n)
    np.testing.assert_allclose(a @ b, matrix, rtol=1e-6, atol=1e-6 * np.abs(matrix).max())


@settings(max_examples=40)
@given(shapes, st.floats(0.01, 1.0))
def test_eckart_young_error_identity(shape, fraction):
    """‖M − A B‖_F / ‖M‖_F = √(Σ_{i>r} σ_i²) / ‖M‖_F = √(1 − energy kept), σ from LAPACK."""
    m, n, seed = shape
    matrix = _matrix(seed, m, n).astype(np.float64)
    spectrum = Spectrum.of(matrix)
    rank = max(1, min(spectrum.full_rank, int(np.ceil(fraction * spectrum.full_rank))))
    a, b = spectrum.factors(matrix, rank)
    sigma = np.linalg.svd(matrix, compute_uv=False)
    expected = np.sqrt(np.sum(sigma[rank:] ** 2)) / np.linalg.norm(matrix)
    error = np.linalg.norm(matrix - a @ b) / np.linalg.norm(matrix)
    assert error == pytest.approx(expected, abs=1e-6)
    assert np.sqrt(max(0.0, 1.0 - spectrum.energy_kept(rank))) == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(spectrum.singular_values, sigma, rtol=1e-6, atol=1e-9 * sigma[0])


def test_factors_split_singular_values_evenly():
    matrix = _matrix(0, 6, 9).astype(np.float64)
    spectrum = Spectrum.of(matrix)
    a, b = spectrum.factors(matrix, 3)
    sigma = spectrum.singular_values[:3]
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.sqrt(sigma), rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), np.sqrt(sigma), rtol=1e-9)


@pytest.mark.parametrize(("m", "n"), [(4, 30), (30, 4), (12, 12), (1, 7), (7, 1)])
def test_tall_and_wide_match_numpy_svd(m, n):
    matrix = _matrix(m * n, m, n)
    spectrum = Spectrum.of(matrix)
    assert (spectrum.m, spectrum.n, spectrum.full_rank) == (m, n, min(m, n))
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(spectrum.singular_values, sigma, rtol=1e-6)
    for rank in range(1, min(m, n) + 1):
        a, b = spectrum.factors(matrix, rank)
        error = np.linalg.norm(matrix - a @ b)
        assert error == pytest.approx(np.sqrt(np.sum(sigma[rank:] ** 2)), abs=1e-5 * sigma[0])


@pytest.mark.parametrize(("m", "n", "true_rank"), [(8, 20, 3), (20, 8, 3), (10, 10, 1)])
def test_rank_deficient_matrix(m, n, true_rank):
    matrix = _matrix(7, m, n, rank=true_rank)
    spectrum = Spectrum.of(matrix)
    sigma = spectrum.singular_values
    assert sigma[true_rank - 1] > 1e-3 * sigma[0]
    assert np.all(sigma[true_rank:] < 1e-5 * sigma[0])
    # The true rank reproduces it exactly; asking for more does not divide by ~0 singular values.
    for rank in (true_rank, spectrum.full_rank):
        a, b = spectrum.factors(matrix, rank)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        np.testing.assert_allclose(a @ b, matrix, atol=1e-5 * np.abs(matrix).max())
    assert spectrum.rank_for_energy(0.999999) == true_rank


def test_zero_matrix():
    matrix = np.zeros((3, 5), dtype=np.float32)
    spectrum = Spectrum.of(matrix)
    assert spectrum.energy_kept(1) == 1.0
    assert spectrum.rank_for_energy(0.9) == 1
    a, b = spectrum.factors(matrix, 2)
    assert np.all(a @ b == 0)


def test_energy_and_rank_for_energy():
    matrix = np.diag([4.0, 2.0, 1.0, 1.0]).astype(np.float32)  # σ² = 16, 4, 1, 1 → total 22
    spectrum = Spectrum.of(matrix)
    np.testing.assert_allclose(spectrum.energy, np.cumsum([16, 4, 1, 1]) / 22)
    assert spectrum.energy_kept(1) == pytest.approx(16 / 22)
    assert spectrum.rank_for_energy(16 / 22) == 1  # exactly reached counts
    assert spectrum.rank_for_energy(16 / 22 + 1e-6) == 2
    assert spectrum.rank_for_energy(0.5) == 1
    assert spectrum.rank_for_energy(21 / 22) == 3
    assert spectrum.rank_for_energy(1.0) == 4


@settings(max_examples=30)
@given(shapes, st.floats(0.001, 1.0))
def test_rank_for_energy_is_the_smallest_rank_that_keeps_it(shape, fraction):
    m, n, seed = shape
    spectrum = Spectrum.of(_matrix(seed, m, n))
    rank = spectrum.rank_for_energy(fraction)
    assert 1 <= rank <= spectrum.full_rank
    assert spectrum.energy_kept(rank) >= fraction - 1e-9
    if rank > 1:
        assert spectrum.energy_kept(rank - 1) < fraction


def test_release_drops_the_basis():
    matrix = _matrix(1, 3, 4)
    spectrum = Spectrum.of(matrix)
    spectrum.release()
    assert spectrum.energy_kept(2) > 0  # the singular values stay
    with pytest.raises(ValueError, match="released"):
        spectrum.factors(matrix, 2)


# The policies map a spectrum to a rank (lrdeploy/planning/policy.py).


def test_rank_ratio_rounds_half_up():
    assert round_half_up(2.5) == 3 and round_half_up(2.4999) == 2
    spectrum = Spectrum.of(_matrix(0, 10, 40))  # full rank 10
    assert RankRatio(0.25).rank(spectrum) == 3  # 2.5 → 3 (Python's round would give 2)
    assert RankRatio(0.01).rank(spectrum) == 1  # never 0
    assert RankRatio(1.0).rank(spectrum) == 10
    assert FixedRank(50).rank(spectrum) == 10
    assert Energy(1.0).rank(spectrum) == 10


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan")])
def test_policies_reject_values_outside_unit_interval(bad):
    from lrdeploy.errors import UsageError

    with pytest.raises(UsageError, match="must be in"):
        RankRatio(bad)
    with pytest.raises(UsageError, match="must be in"):
        Energy(bad)
