"""Fast second-moment sums: chunked float32 products into float64, and conv patch Grams by shifts.

**Chunked products** (`add_gram`, `add_cross`). Activations arrive from onnxruntime in float32, whose
products are exact in float64 but whose float64 GEMM runs at half the float32 rate (and tall, narrow
XᵀX far below either peak). Each product here spans at most `CHUNK` rows in float32 — the rounding of
a float32 sum of k terms grows like √k·2⁻²⁴ (4e-6 at 4,096 rows, as a bound; measured 1–4e-8
relative to the float64 sum on ReLU'd activations, tests/test_patchgram.py) — and the chunks are summed
in a float64 accumulator, so the error does not grow with the number of rows or samples. float64 rows
stay float64.

**Conv patch Grams by shifts** (`add_conv_gram`). For a stride-1 Conv on the zero-padded input
P [N, C, H, W] with kernel offsets o_k = (i·d₁, j·d₂), the im2col row of output position p is
(P[:, p + o_k])_k, and the Gram's block for offsets (k, k') is

    G_kk' = Σ_n Σ_{p ∈ R} P[n, :, p + o_k] P[n, :, p + o_k']ᵀ = Σ_{q ∈ R + o_k} P[q] P[q + Δ]ᵀ,
    R = [0, H_o) × [0, W_o),  Δ = o_k' − o_k.

Blocks with the same Δ sum the same products over windows R + o_k that differ by a few rows or columns,
so the first is summed in full and each next one is the previous plus the strip its window gains minus
the strip it loses (the same products, regrouped: exact up to rounding). A 3×3 conv has 13 distinct Δ
for its 45 blocks (k ≤ k'), so the Gram costs about 13·C² MACs per position plus strips, against
40.5·C² for the symmetric product of its im2col rows: ~3× less on ResNet-50's 3×3 convs, and no
patch matrix is formed. Strided convs have no such structure and go through im2col (`calibrate`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

__all__ = ["CHUNK", "add_conv_gram", "add_cross", "add_gram", "add_taps"]

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


def _window_change(a: tuple[int, int], b: tuple[int, int], size: tuple[int, int]) -> list[tuple[int, Rect]]:
    """(sign, rect) pieces with Σ over window b = Σ over window a + Σ sign·Σ over rect (same-size windows)."""
    (ay, ax), (by, bx), (h, w) = a, b, size
    rows_a, rows_b, cols_a, cols_b = (ay, ay + h), (by, by + h), (ax, ax + w), (bx, bx + w)

    def minus(p: tuple[int, int], q: tuple[int, int]) -> tuple[int, int]:
        """p ∖ q for two intervals of the same length: one interval (possibly empty)."""
        if q[1] <= p[0] or q[0] >= p[1]:
            return p
        return (p[0], q[0]) if q[0] > p[0] else (q[1], p[1])

    both = (max(rows_a[0], rows_b[0]), min(rows_a[1], rows_b[1]))
    pieces = [
        (1, (*minus(rows_b, rows_a), *cols_b)),
        (-1, (*minus(rows_a, rows_b), *cols_a)),
        (1, (*both, *minus(cols_b, cols_a))),
        (-1, (*both, *minus(cols_a, cols_b))),
    ]
    return [(sign, rect) for sign, rect in pieces if rect[1] > rect[0] and rect[3] > rect[2]]


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


def add_conv_gram(
    x: np.ndarray,
    begin: Sequence[int],
    end: Sequence[int],
    dilations: Sequence[int],
    kernel_shape: Sequence[int],
    taps: np.ndarray,
) -> int:
    """Add the Gram of a stride-1 2-D Conv's im2col rows of x [N, C, H, W] to ``taps``; returns the rows.

    ``taps`` is tap-major (index k·C + c) and holds only the blocks k ≤ k' (`add_taps` completes and
    reorders it): blocks are written whole, not scattered into the (c, k) order of the weight's
    columns, whose strided writes cost more than the products on 7×7 inputs. Pads ``begin``/``end``
    per axis are resolved ones.
    """
    samples, channels = x.shape[:2]
    height, width = x.shape[2] + begin[0] + end[0], x.shape[3] + begin[1] + end[1]
    padded = np.zeros((channels, samples, height, width), _working(x).dtype)
    padded[:, :, begin[0] : begin[0] + x.shape[2], begin[1] : begin[1] + x.shape[3]] = x.transpose(1, 0, 2, 3)
    size = (height - (kernel_shape[0] - 1) * dilations[0], width - (kernel_shape[1] - 1) * dilations[1])
    if size[0] <= 0 or size[1] <= 0 or samples == 0:
        return 0
    offsets = [
        (i * dilations[0], j * dilations[1]) for i in range(kernel_shape[0]) for j in range(kernel_shape[1])
    ]
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for k, first in enumerate(offsets):
        for k2 in range(k, len(offsets)):
            groups.setdefault((offsets[k2][0] - first[0], offsets[k2][1] - first[1]), []).append((k, k2))
    area = size[0] * size[1]
    block = np.zeros((channels, channels))
    for shift, pairs in groups.items():
        previous: tuple[int, int] | None = None
        for k, k2 in sorted(pairs, key=lambda pair: offsets[pair[0]]):
            base = offsets[k]
            pieces = _window_change(previous, base, size) if previous is not None else []
            if previous is None or sum((r[1] - r[0]) * (r[3] - r[2]) for _, r in pieces) >= area:
                block[:] = 0.0
                pieces = [(1, (base[0], base[0] + size[0], base[1], base[1] + size[1]))]
            for sign, rect in pieces:
                _rect_cross(padded, rect, shift, block, sign)
            previous = base
            taps[k * channels : (k + 1) * channels, k2 * channels : (k2 + 1) * channels] += block
    return samples * area


def add_taps(taps: np.ndarray, channels: int, total: np.ndarray) -> None:
    """total += the full Gram in the weight's column order (c, k), from `add_conv_gram`'s upper
    tap-major blocks; block by block, so that the transposes stay in cache."""
    kernel = taps.shape[0] // channels
    blocks = total.reshape(channels, kernel, channels, kernel)
    for k in range(kernel):
        for k2 in range(k, kernel):
            block = taps[k * channels : (k + 1) * channels, k2 * channels : (k2 + 1) * channels]
            blocks[:, k, :, k2] += block
            if k2 != k:
                blocks[:, k2, :, k] += block.T
