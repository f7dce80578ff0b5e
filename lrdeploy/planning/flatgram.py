"""Conv Grams from one flat, channel-major, row-interleaved copy of the layer input.

A stride-1 Conv's im2col Gram has blocks G_kk' = Σ_{q ∈ window_k} x[q] x[q + Δ]ᵀ (Δ = o_k' − o_k,
`patchgram`; x is zero outside the input, so only input positions count). Here the chosen samples
are copied once into P [C, H, n, W + r] — input row y of every sample side by side, then the next
row — with r ≥ the kernel's horizontal reach of zero columns after each row of each sample. Flattened
to [C, L], a shift by Δ is a shift of the columns by δ = Δy·n·(W + r) + Δx, and a partner that
crosses a row's edge lands on those zeros (or outside P): so for a range of input rows

    S_Δ(rows) = Σ_{t ∈ rows} P[:, t] P[:, t + δ]ᵀ

is one GEMM on two column ranges of the same array, which BLAS takes without a copy (a symmetric
rank-k update for Δ = 0). A window's rows are a column range of P, so each block is a sum of S_Δ over
the row segments its window covers, minus the few input columns it leaves out (bands, copied out;
each computed once per Δ and segment). Only Δ in the upper half (k ≤ k') is needed: 13 for a 3×3
conv, each costing C² per position of P — against 40.5·C² per output position for the im2col rows.
1×1 convs (any stride, no pads) are one symmetric product of the channel-major copy.

Products span at most `patchgram.CHUNK` columns in float32 and are summed in float64, as elsewhere.
Input values are checked where it is free: the Δ = 0 product's diagonal holds Σ x² of every value the
layer reads, so a NaN or infinity read by the layer makes it non-finite.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

import numpy as np

from lrdeploy.planning import patchgram

__all__ = ["conv_gram", "pointwise_gram", "shifts_cost_less"]

_local = threading.local()

Interval = tuple[int, int]


def _scratch(shape: tuple[int, ...], slot: str = "copy") -> np.ndarray:
    """A per-thread float32 array of ``shape`` (contents undefined), one buffer per ``slot`` reused
    across layers and batches: fresh copies of a batch's activations would page-fault in ~1 GB per
    ResNet-50 batch, fresh product arrays a few MB per product. Slots: "copy" (the layer part's
    channel-major copy) and "product" (one float32 product before it is summed)."""
    size = int(np.prod(shape))
    buffer = getattr(_local, slot, None)
    if buffer is None or buffer.size < size:
        buffer = np.empty(size, np.float32)
        setattr(_local, slot, buffer)
    return buffer[:size].reshape(shape)


class _Blocks:
    """Zeroed float64 C × C blocks for one layer's products, cut from one per-thread array that outlives
    the layer: fresh arrays would be page-faulted in for every layer and batch (~70 per 3×3 layer; on
    VMs that hand freed memory back to the host, a fault is a host fault). The array grows to the
    largest layer's need (~140 MB for a 512-channel 3×3 conv) and is kept while the thread lives."""

    def __init__(self, channels: int) -> None:
        self._size = channels * channels
        self._shape = (channels, channels)
        self._used = 0

    def take(self) -> np.ndarray:
        buffer = getattr(_local, "blocks", None)
        end = self._used + self._size
        if buffer is None or buffer.size < end:
            # blocks already taken keep the old array alive until the layer is done
            buffer = _local.blocks = np.empty(max(end, 2 * (0 if buffer is None else buffer.size)))
        block = buffer[self._used : end].reshape(self._shape)
        self._used = end
        block.fill(0.0)
        return block


def _finite(product: np.ndarray) -> None:
    if not np.isfinite(np.diagonal(product)).all():
        raise ValueError("the inputs hold NaN or infinite values")


def _syrk(flat: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
    """out += Σ over columns [start, stop) of flat [C, L] of its outer products (float32 chunks)."""
    for begin in range(start, stop, patchgram.CHUNK):
        part = flat[:, begin : min(begin + patchgram.CHUNK, stop)]
        # numpy runs a aᵀ on one array as a symmetric rank-k update
        product = np.matmul(part, part.T, out=_scratch(out.shape, "product"))
        _finite(product)
        out += product


def _cross(flat: np.ndarray, start: int, stop: int, shift: int, out: np.ndarray) -> None:
    """out += Σ_t flat[:, t] flat[:, t + shift]ᵀ over t in [start, stop)."""
    for begin in range(start, stop, patchgram.CHUNK):
        end = min(begin + patchgram.CHUNK, stop)
        product = _scratch(out.shape, "product")
        out += np.matmul(flat[:, begin:end], flat[:, begin + shift : end + shift].T, out=product)


def pointwise_gram(x: np.ndarray, samples: np.ndarray, strides: Sequence[int], out: np.ndarray) -> int:
    """out += the Gram of a 1×1 Conv's rows (no pads) for x [N, C, H, W]'s ``samples``; returns rows."""
    picked = x[:, :, :: strides[0], :: strides[1]] if any(s != 1 for s in strides) else x
    flat = _Copy(picked, samples, 0).flat
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite values: `_finite` says so
        _syrk(flat, 0, flat.shape[1], out)
    return flat.shape[1]


def _segments(bounds: set[int], whole: Interval) -> list[Interval]:
    cuts = sorted({*bounds, *whole} & set(range(whole[0], whole[1] + 1)))
    return list(itertools.pairwise(cuts))


def _clip(window: Interval, size: int) -> Interval:
    return max(window[0], 0), min(window[1], size)


def _minus(whole: Interval, part: Interval) -> list[Interval]:
    """whole ∖ part for intervals: at most two."""
    pieces = [(whole[0], min(whole[1], part[0])), (max(whole[0], part[1]), whole[1])]
    return [piece for piece in pieces if piece[1] > piece[0]]


class _Windows:
    """The taps of a stride-1 2-D conv, their windows in input coordinates, and the row segments the
    windows' edges cut the input rows into."""

    def __init__(
        self,
        shape: Sequence[int],
        begin: Sequence[int],
        end: Sequence[int],
        dilations: Sequence[int],
        kernel_shape: Sequence[int],
    ) -> None:
        self.height, self.width = shape
        self.reach = [(k - 1) * d for k, d in zip(kernel_shape, dilations, strict=True)]
        self.out = (
            self.height + begin[0] + end[0] - self.reach[0],
            self.width + begin[1] + end[1] - self.reach[1],
        )
        taps = itertools.product(range(kernel_shape[0]), range(kernel_shape[1]))
        self.offsets = [(i * dilations[0], j * dilations[1]) for i, j in taps]
        self.rows, self.cols = [], []
        for oy, ox in self.offsets:
            self.rows.append(_clip((oy - begin[0], oy - begin[0] + self.out[0]), self.height))
            self.cols.append(_clip((ox - begin[1], ox - begin[1] + self.out[1]), self.width))
        self.segments = _segments({edge for rows in self.rows for edge in rows}, (0, self.height))

    def pairs(self):
        """(k, k', Δ, the row segments k's window covers, the (rows, columns) bands of input positions
        it leaves out whose partners Δ away lie inside the input)."""
        for k, first in enumerate(self.offsets):
            rows = self.rows[k]
            if rows[1] <= rows[0] or self.cols[k][1] <= self.cols[k][0]:
                continue
            segments = tuple(seg for seg in self.segments if rows[0] <= seg[0] and seg[1] <= rows[1])
            left_out = _minus((0, self.width), self.cols[k])
            for k2 in range(k, len(self.offsets)):
                dy, dx = self.offsets[k2][0] - first[0], self.offsets[k2][1] - first[1]
                # a band whose partners all lie outside the input adds nothing: left out of the sums
                ys = (rows[0], min(rows[1], self.height - dy))
                xs = [(max(a, -dx), min(b, self.width - dx)) for a, b in left_out]
                bands = [(ys, band) for band in xs if band[1] > band[0] and ys[1] > ys[0]]
                yield k, k2, (dy, dx), segments, bands

    def cost(self, samples: int) -> float:
        """Multiply-adds per channel² of `conv_gram`: products over P and the left-out bands."""
        products, bands = set(), set()
        for _, _, delta, segments, out in self.pairs():
            products.update((delta, seg) for seg in segments)
            bands.update((delta, *band) for band in out)
        width = self.width + self.reach[1]
        area = sum((seg[1] - seg[0]) * width for _, seg in products)
        area += sum((rows[1] - rows[0]) * (cols[1] - cols[0]) for _, rows, cols in bands)
        return samples * area


class _Copy:
    """P [C, H, n, W + r] of the chosen samples, with its shift products and band products cached."""

    def __init__(self, x: np.ndarray, samples: np.ndarray, reach: int) -> None:
        _, channels, height, width = x.shape
        self.padded = _scratch((channels, height, len(samples), width + reach))
        if reach:
            self.padded[..., width:] = 0.0
        for slot, sample in enumerate(samples):
            self.padded[:, :, slot, :width] = x[sample]
        self.channels, self.height, self.samples, self.pitch = self.padded.shape
        self.flat = self.padded.reshape(channels, -1)
        self.row = self.samples * self.pitch  # flat columns per input row
        self._products: dict[tuple, np.ndarray] = {}
        self._blocks = _Blocks(channels)

    def shift(self, delta: tuple[int, int], rows: Interval) -> np.ndarray:
        """Σ over input positions q in ``rows`` of x[q] x[q + Δ]ᵀ (Δ lexicographically ≥ 0)."""
        key = (delta, rows)
        if key not in self._products:
            offset = delta[0] * self.row + delta[1]
            start, stop = rows[0] * self.row, min(rows[1] * self.row, self.flat.shape[1] - offset)
            total = self._blocks.take()
            if offset == 0:
                _syrk(self.flat, start, stop, total)
            elif stop > start:
                _cross(self.flat, start, stop, offset, total)
            self._products[key] = total
        return self._products[key]

    def rows(self, delta: tuple[int, int], segments: tuple[Interval, ...]) -> np.ndarray:
        """`shift` summed over row segments (cached: windows of several taps share them)."""
        if len(segments) == 1:
            return self.shift(delta, segments[0])
        key = (delta, segments)
        if key not in self._products:
            total = self._blocks.take()
            total += self.shift(delta, segments[0])
            for segment in segments[1:]:
                total += self.shift(delta, segment)
            self._products[key] = total
        return self._products[key]

    def band(self, delta: tuple[int, int], rows: Interval, cols: Interval) -> np.ndarray:
        """Σ over input positions q in rows × cols of x[q] x[q + Δ]ᵀ (copies of the band; the
        partners must lie in P)."""
        key = (delta, rows, cols)
        if key not in self._products:
            dy, dx = delta
            (y0, y1), (x0, x1) = rows, cols
            total = self._blocks.take()
            if y1 > y0 and x1 > x0:
                per_row = self.samples * (x1 - x0)
                step = max(1, patchgram.CHUNK // per_row)
                for r in range(y0, y1, step):
                    r1 = min(r + step, y1)
                    a = self.padded[:, r:r1, :, x0:x1].reshape(self.channels, -1)
                    b = self.padded[:, r + dy : r1 + dy, :, x0 + dx : x1 + dx].reshape(self.channels, -1)
                    total += np.matmul(a, b.T, out=_scratch((self.channels,) * 2, "product"))
            self._products[key] = total
        return self._products[key]


def shifts_cost_less(
    shape: Sequence[int],
    begin: Sequence[int],
    end: Sequence[int],
    dilations: Sequence[int],
    kernel_shape: Sequence[int],
) -> bool:
    """Whether `conv_gram` takes fewer multiply-adds than the symmetric product of the im2col rows,
    (C·k)²/2 per output position."""
    windows = _Windows(shape, begin, end, dilations, kernel_shape)
    out = max(windows.out[0], 0) * max(windows.out[1], 0)
    return windows.cost(1) < out * len(windows.offsets) ** 2 / 2


def conv_gram(
    x: np.ndarray,
    samples: np.ndarray,
    begin: Sequence[int],
    end: Sequence[int],
    dilations: Sequence[int],
    kernel_shape: Sequence[int],
    taps: np.ndarray,
) -> int:
    """Add the Gram of a stride-1 2-D Conv's im2col rows over x [N, C, H, W]'s ``samples`` to ``taps``
    (tap-major, index k·C + c; upper blocks k ≤ k' only, as `patchgram.ordered` reads them); returns
    the rows. Pads ``begin``/``end`` are resolved ones."""
    windows = _Windows(x.shape[2:], begin, end, dilations, kernel_shape)
    if windows.out[0] <= 0 or windows.out[1] <= 0 or len(samples) == 0:
        return 0
    copy = _Copy(x, samples, windows.reach[1])
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite values: `_finite` says so
        for segment in windows.segments:  # first: the diagonals check every value the layer reads
            copy.shift((0, 0), segment)
    _add_blocks(copy, windows, taps)
    return len(samples) * windows.out[0] * windows.out[1]


def _add_blocks(copy: _Copy, windows: _Windows, taps: np.ndarray) -> None:
    """taps[k, k'] += the window sum of each pair: its row segments' products less its bands."""
    channels = copy.channels
    left_out = np.empty((channels, channels))
    for k, k2, delta, segments, bands in windows.pairs():
        block = taps[k * channels : (k + 1) * channels, k2 * channels : (k2 + 1) * channels]
        if not bands:
            block += copy.rows(delta, segments)
            continue
        np.subtract(copy.rows(delta, segments), copy.band(delta, *bands[0]), out=left_out)
        for band in bands[1:]:
            left_out -= copy.band(delta, *band)
        block += left_out
