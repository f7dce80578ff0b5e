"""Fast second-moment sums: conv patch Grams by shifts (`flatgram`) against brute-force im2col; float32
chunk rounding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrdeploy.planning import flatgram, patchgram
from lrdeploy.planning.calibrate import conv_pads, conv_rows
from lrdeploy.planning.patchgram import add_gram, add_taps


@st.composite
def stride_one_convs(draw):
    kernel = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=2)))
    dilations = draw(st.lists(st.integers(1, 3), min_size=2, max_size=2))
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    pads = draw(st.lists(st.integers(0, 3), min_size=4, max_size=4))
    sizes = [max(1, e - pads[a] - pads[a + 2]) + draw(st.integers(0, 5)) for a, e in enumerate(extents)]
    channels, batch = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((batch, channels, *sizes))
    samples = np.flatnonzero(draw(st.lists(st.booleans(), min_size=batch, max_size=batch)))
    return x.astype(np.float32), {"pads": pads, "dilations": dilations}, kernel, samples


def _gram_by_shifts(x, attrs, kernel, samples) -> tuple[np.ndarray, int]:
    begin, end = conv_pads(x.shape[2:], attrs, kernel)
    dim = x.shape[1] * int(np.prod(kernel))
    taps, total = np.zeros((dim, dim)), np.zeros((dim, dim))
    count = flatgram.conv_gram(x, samples, begin, end, attrs["dilations"], kernel, taps)
    add_taps(taps, x.shape[1], total)
    return total, count


@settings(max_examples=120)
@given(stride_one_convs())
def test_shift_gram_equals_the_gram_of_the_im2col_rows(case):
    """Pads (asymmetric, wider than the kernel), dilations, kernels up to 4×4, any subset of samples."""
    x, attrs, kernel, samples = case
    rows = conv_rows(x[samples], attrs, kernel).astype(np.float64)
    total, count = _gram_by_shifts(x, attrs, kernel, samples)
    assert count == rows.shape[0]
    np.testing.assert_allclose(total, rows.T @ rows, rtol=1e-5, atol=1e-4)


def test_shift_gram_does_not_depend_on_the_chunk_size(monkeypatch):
    """Products longer than a chunk are summed chunk by chunk, bands too; the result does not change."""
    x = np.maximum(np.random.default_rng(1).standard_normal((3, 5, 19, 23)), 0).astype(np.float32)
    attrs, kernel, samples = {"pads": [1, 2, 0, 1], "dilations": [1, 2]}, (3, 3), np.array([0, 2])
    rows = conv_rows(x[samples], attrs, kernel).astype(np.float64)
    monkeypatch.setattr(patchgram, "CHUNK", 7)  # fewer terms than one row of the input
    total, _ = _gram_by_shifts(x, attrs, kernel, samples)
    np.testing.assert_allclose(total, rows.T @ rows, rtol=1e-5)


def test_pooled_blocks_grow_mid_layer_and_are_reused_across_layers(monkeypatch):
    """The per-thread block array starts too small, grows while a layer holds blocks, and serves a
    narrower layer after a wider one: every Gram still equals the im2col rows' Gram."""
    monkeypatch.setattr(flatgram._local, "blocks", np.empty(3), raising=False)
    rng = np.random.default_rng(5)
    attrs, kernel = {"pads": [1, 1, 1, 1], "dilations": [1, 1]}, (3, 3)
    for channels in (6, 17, 4):
        x = rng.standard_normal((2, channels, 7, 6)).astype(np.float32)
        samples = np.arange(2)
        rows = conv_rows(x, attrs, kernel).astype(np.float64)
        total, _ = _gram_by_shifts(x, attrs, kernel, samples)
        np.testing.assert_allclose(total, rows.T @ rows, rtol=1e-5, atol=1e-4)


@settings(max_examples=40)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**16))
def test_pointwise_gram_equals_the_gram_of_a_strided_1x1_convs_rows(sy, sx, height, width, seed):
    x = np.random.default_rng(seed).standard_normal((3, 4, height, width)).astype(np.float32)
    attrs, samples = {"strides": [sy, sx]}, np.array([0, 2])
    rows = conv_rows(x[samples], attrs, (1, 1)).astype(np.float64)
    total = np.zeros((4, 4))
    assert flatgram.pointwise_gram(x, samples, [sy, sx], total) == rows.shape[0]
    np.testing.assert_allclose(total, rows.T @ rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_the_conv_reads_is_an_error(value):
    x = np.ones((2, 3, 6, 6), np.float32)
    x[1, 2, 5, 0] = value
    taps = np.zeros((27, 27))
    with pytest.raises(ValueError, match="NaN or infinite"):
        flatgram.conv_gram(x, np.array([0, 1]), [1, 1], [1, 1], [1, 1], (3, 3), taps)
    with pytest.raises(ValueError, match="NaN or infinite"):
        flatgram.pointwise_gram(x, np.array([1]), [1, 1], np.zeros((3, 3)))


def test_shifts_are_chosen_only_where_they_cost_less_than_im2col():
    assert flatgram.shifts_cost_less((56, 56), [1, 1], [1, 1], [1, 1], (3, 3))
    assert flatgram.shifts_cost_less((7, 7), [1, 1], [1, 1], [1, 1], (3, 3))
    assert not flatgram.shifts_cost_less((7, 7), [0, 0], [0, 0], [1, 1], (7, 7))  # one output position


def _activations(rows: int, width: int = 64, seed: int = 0) -> np.ndarray:
    """ReLU'd correlated activations, like a conv layer's input."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((width, width)) / np.sqrt(width)
    return np.maximum(rng.standard_normal((rows, width)) @ mixing + 0.3, 0).astype(np.float32)


def test_float32_chunk_products_stay_within_1e_6_of_float64_and_do_not_drift():
    """float32 products of ≤ CHUNK rows, summed in float64: measured 1–4e-8 relative (Frobenius) at
    4,096-row chunks, and the error does not grow with the number of rows."""
    errors = []
    for rows in (20_000, 200_000):
        x = _activations(rows)
        exact = x.astype(np.float64).T @ x.astype(np.float64)
        fast = np.zeros_like(exact)
        add_gram(x, fast)
        errors.append(np.linalg.norm(fast - exact) / np.linalg.norm(exact))
    assert max(errors) < 1e-6, errors
    assert errors[1] < 3 * errors[0], errors


def test_float64_rows_stay_float64(monkeypatch):
    x = _activations(5_000).astype(np.float64) * (1 + 1e-12)
    exact = x.T @ x
    fast = np.zeros_like(exact)
    add_gram(x, fast)
    np.testing.assert_allclose(fast, exact, rtol=1e-12)


def test_the_reused_product_buffer_gives_the_same_sums(monkeypatch):
    x = _activations(9_000, width=48)
    fresh = np.zeros((48, 48))
    add_gram(x, fresh)
    monkeypatch.setattr(patchgram, "_SCRATCH_BYTES", 0)
    reused = np.zeros((48, 48))
    add_gram(x, reused)
    add_gram(x[:100], reused)  # the buffer is reused, not aliased into the sum
    add_gram(x[:100], fresh)
    np.testing.assert_array_equal(reused, fresh)
