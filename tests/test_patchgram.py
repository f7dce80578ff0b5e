"""Fast second-moment sums: conv patch Grams by shifts against brute-force im2col; float32 chunk rounding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrdeploy.planning import patchgram
from lrdeploy.planning.calibrate import conv_pads, conv_rows
from lrdeploy.planning.patchgram import _window_change, add_conv_gram, add_gram, add_taps


@st.composite
def stride_one_convs(draw):
    kernel = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=2)))
    dilations = draw(st.lists(st.integers(1, 3), min_size=2, max_size=2))
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    pads = draw(st.lists(st.integers(0, 3), min_size=4, max_size=4))
    sizes = [max(1, e - pads[a] - pads[a + 2]) + draw(st.integers(0, 5)) for a, e in enumerate(extents)]
    channels, batch = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    x = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((batch, channels, *sizes))
    return x.astype(np.float32), {"pads": pads, "dilations": dilations}, kernel


@settings(max_examples=80)
@given(stride_one_convs())
def test_shift_gram_equals_the_gram_of_the_im2col_rows(case):
    x, attrs, kernel = case
    rows = conv_rows(x, attrs, kernel).astype(np.float64)
    begin, end = conv_pads(x.shape[2:], attrs, kernel)
    taps = np.zeros((rows.shape[1], rows.shape[1]))
    count = add_conv_gram(x, begin, end, attrs["dilations"], kernel, taps)
    assert count == rows.shape[0]
    total = np.zeros_like(taps)
    add_taps(taps, x.shape[1], total)
    np.testing.assert_allclose(total, rows.T @ rows, rtol=1e-5, atol=1e-4)


def test_shift_gram_on_a_wide_input_uses_chunks_and_row_bands(monkeypatch):
    """Windows larger than a chunk are summed in row bands; the result does not depend on it."""
    x = np.maximum(np.random.default_rng(1).standard_normal((2, 5, 19, 23)), 0).astype(np.float32)
    attrs, kernel = {"pads": [1, 2, 0, 1], "dilations": [1, 2]}, (3, 3)
    rows = conv_rows(x, attrs, kernel).astype(np.float64)
    begin, end = conv_pads(x.shape[2:], attrs, kernel)
    monkeypatch.setattr(patchgram, "CHUNK", 7)  # fewer terms than one row of the window
    taps = np.zeros((45, 45))
    add_conv_gram(x, begin, end, attrs["dilations"], kernel, taps)
    total = np.zeros_like(taps)
    add_taps(taps, 5, total)
    np.testing.assert_allclose(total, rows.T @ rows, rtol=1e-5)


@settings(max_examples=200)
@given(st.tuples(*[st.integers(0, 4)] * 4), st.tuples(st.integers(1, 5), st.integers(1, 5)))
def test_window_change_turns_one_window_sum_into_the_other(corners, size):
    a, b = corners[:2], corners[2:]
    field = np.random.default_rng(sum(corners)).standard_normal((12, 12))

    def window(at):
        return field[at[0] : at[0] + size[0], at[1] : at[1] + size[1]].sum()

    moved = window(a) + sum(
        sign * field[y0:y1, x0:x1].sum() for sign, (y0, y1, x0, x1) in _window_change(a, b, size)
    )
    assert moved == pytest.approx(window(b), abs=1e-9)


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
