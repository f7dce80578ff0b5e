"""Fast second-moment sums: chunked float32 products into float64, and conv patch Grams by shifts.

**Chunked products** (`add_gram`, `add_cross`). Activations arrive from onnxruntime in float32, whose
products are exact in float64 but whose float64 GEMM runs at half the float32 rate (and tall, narrow
XᵀX far below either peak). Each product here spans at most `CHUNK` rows in float32 — the rounding of
a float32 sum of k terms grows like √k·2⁻²⁴ (4e-6 at 4,096 rows, as a bound; measured 1–4e-8
relative to the float64 sum on ReLU'd activations, tests/test_patchgram.py) — and the chunks are summed
in a float64 accumulator, so the error does not grow with the number of rows or samples. float64 rows
stay float64.

**Conv patch Grams by shifts**. For a stride-1 Conv on the zero-padded input
P [N, C, H, W] with kernel offsets o_k = (i·d₁, j·d₂), the im2col row of output position p is
(P[:, p + o_k])_k, and the Gram's block for offsets (k, k') is

    G_kk' = Σ_n Σ_{p ∈ R} P[n, :, p + o_k] P[n, :, p + o_k']ᵀ = Σ_{q ∈ R + o_k} P[q] P[q + Δ]ᵀ,
    R = [0, H_o) × [0, W_o),  Δ = o_k' − o_k.

Blocks with the same Δ sum the same products over windows that differ by a few rows or columns: a
3×3 conv has 13 distinct Δ for its 45 blocks (k ≤ k'), so the Gram costs about 13·C² MACs per
position, against 40.5·C² for the symmetric product of its im2col rows, and no patch matrix is
formed. `lrdeploy.planning.flatgram` computes them (in tap-major order); `ordered` puts them in the
weight's column order. `gramgraph` forms them inside onnxruntime and corrects the windows here
(`_rect_cross`).
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["CHUNK", "add_cross", "add_gram", "add_taps", "ordered"]

#: Rows (terms) per float32 product before it is added to the float64 accumulator.
CHUNK = 4096
#: Products at least this large reuse a per-thread buffer (`_scratch`).
_SCRATCH_BYTES = 16 << 20


def _working(array: np.ndarray) -> np.ndarray:
    return array if array.dtype in (np.float32, np.float64) else array.astype(np.float32)


def add_gram(rows: np.ndarray, out: np.ndarray) -> None:
    """out += rowsᵀ rows (rows r × d), in products of at most `CHUNK` rows."""
    work = _working(rows)
    product = _scratch(work.shape[1], work.dtype)
    for start in range(0, work.shape[0], CHUNK):
        chunk = work[start : start + CHUNK]
        out += np.matmul(chunk.T, chunk, out=product)  # numpy runs aᵀa as a symmetric rank-k update


_local = threading.local()


def _scratch(dim: int, dtype: np.dtype) -> np.ndarray | None:
    """A reused dim × dim product buffer per thread for wide layers (None: let numpy allocate): fresh
    arrays above glibc's mmap threshold are page-faulted in on every product (0.3 s at 4,608²)."""
    if dim * dim * np.dtype(dtype).itemsize < _SCRATCH_BYTES:
        return None
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.shape != (dim, dim) or buffer.dtype != dtype:
        buffer = _local.buffer = np.empty((dim, dim), dtype)
    return buffer


def add_cross(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out += a bᵀ for a, b of shape (d, t), in products of at most `CHUNK` columns (a is b: Gram)."""
    work_a = _working(a)
    work_b = work_a if b is a else _working(b)
    for start in range(0, work_a.shape[1], CHUNK):
        left = work_a[:, start : start + CHUNK]
        out += left @ (left if b is a else work_b[:, start : start + CHUNK]).T


Rect = tuple[int, int, int, int]  # rows [y0, y1) × columns [x0, x1) of the padded input


def _rect_cross(padded: np.ndarray, rect: Rect, shift: tuple[int, int], out: np.ndarray, sign: int) -> None:
    """out += sign · Σ_{q ∈ rect} P[q] P[q + shift]ᵀ over every sample; ``padded`` is [C, N, H, W]."""
    y0, y1, x0, x1 = rect
    dy, dx = shift
    channels, samples = padded.shape[:2]
    height, width = y1 - y0, x1 - x0
    per_sample = height * width
    step = max(1, CHUNK // per_sample)
    band = height if per_sample <= CHUNK else max(1, CHUNK // width)
    part = np.zeros_like(out) if sign < 0 else out
    for s in range(0, samples, step):
        for r in range(y0, y1, band):
            rows = slice(r, min(r + band, y1))
            a = padded[:, s : s + step, rows, x0:x1].reshape(channels, -1)
            if shift == (0, 0):
                add_cross(a, a, part)
                continue
            b = padded[:, s : s + step, rows.start + dy : rows.stop + dy, x0 + dx : x1 + dx]
            add_cross(a, b.reshape(channels, -1), part)
    if sign < 0:
        out -= part


def ordered(taps: np.ndarray, channels: int) -> np.ndarray:
    """The full Gram in the weight's column order (c, k), from `flatgram.conv_gram`'s upper tap-major
    blocks, in ``taps``'s own memory (returned): its lower blocks are filled with the upper ones'
    transposes, then rows and columns are permuted in place. A new d × d array would cost more than
    the permutation — fresh pages fault in at ~0.5 ms/MB on this project's machines."""
    kernel = taps.shape[0] // channels
    blocks = taps.reshape(kernel, channels, kernel, channels)
    for k in range(kernel):
        for k2 in range(k + 1, kernel):
            blocks[k2, :, k, :] = blocks[k, :, k2, :].T
    source = np.arange(taps.shape[0]).reshape(kernel, channels).T.reshape(-1)  # row i ← row source[i]
    done = source == np.arange(len(source))
    row = np.empty(taps.shape[1], taps.dtype)
    for start in np.flatnonzero(~done):
        if done[start]:
            continue
        row[:] = taps[start]
        i = start
        while source[i] != start:
            taps[i], done[i] = taps[source[i]], True
            i = source[i]
        taps[i], done[i] = row, True
    for values in taps:
        values[:] = values[source]
    return taps


def add_taps(taps: np.ndarray, channels: int, total: np.ndarray) -> None:
    """total += `ordered` (taps, channels); ``taps`` is used up (reordered in place)."""
    total += ordered(taps, channels)
