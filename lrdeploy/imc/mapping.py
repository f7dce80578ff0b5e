"""Crossbar arithmetic: how many AR×AC arrays a weight matrix needs, how full they are, and how many
computing cycles a whole output map costs under im2col, SDK and VW-SDK mapping. Pure numbers, no ONNX.

A layer is an unrolled matrix of ``rows`` (inputs: Cin/groups·Πk for a Conv) × ``cols`` (outputs: Cout
per group) programmed into arrays, one group after the other:

- arrays = groups·⌈rows/AR⌉·⌈cols/AC⌉; utilization = groups·rows·cols ÷ (arrays·AR·AC)
- a *cycle* is one array read (one matrix–vector product on one AR×AC array), the measure of the SDK and
  VW-SDK papers: with one array time-multiplexed over the tiles, cycles is the latency; with every tile
  on its own array, latency is about cycles ÷ arrays.
- im2col: each output position is one input vector: cycles = positions·⌈rows/AR⌉·⌈cols/AC⌉.
- SDK (shift and duplicate kernels; Zhang et al., TCAD 2020, as computed by Rhe et al.'s VW-SDK code):
  a square parallel window (PW) of i×i output positions whose inputs span (K+i−1)² pixels·Cin rows; the
  kernel is duplicated i² times, shifted, across i²·Cout columns. The arrays the im2col matrix needs are
  used as one larger array (⌈rows/AR⌉·AR × ⌈cols/AC⌉·AC); the largest i that fits and does not cost
  more wins: cycles = ⌈OH/i⌉·⌈OW/i⌉·⌈rows/AR⌉·⌈cols/AC⌉.
- VW-SDK (Rhe et al., DATE 2022): a variable oh×ow window with channels tiled to fit one array:
  ICt = min(Cin, ⌊AR/(PWh·PWw)⌋), OCt = min(Cout, ⌊AC/(oh·ow)⌋),
  cycles = ⌈OH/oh⌉·⌈OW/ow⌉·⌈Cin/ICt⌉·⌈Cout/OCt⌉, minimized over (ow, oh) (ties: the first found, ow
  outer); im2col when it is cheaper. ⌈OH/oh⌉ equals the papers' ⌈(IH−PWh)/oh⌉+1 at stride 1.

Strides and dilations generalize the window: PWh is the number of distinct input rows the window reads,
|{a·s + b·d : a < oh, b < K}|. Gemm/MatMul have no window to share: every mapping is im2col.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lrdeploy.errors import UsageError

__all__ = [
    "MAPPINGS",
    "ArraySize",
    "Geometry",
    "Window",
    "arrays_needed",
    "cycles",
    "im2col_cycles",
    "parse_array",
    "sdk_window",
    "utilization",
    "vwsdk_window",
    "window",
]

MAPPINGS = ("im2col", "sdk", "vwsdk")
#: Arrays larger than this per side are not crossbars; also keeps the window search small.
MAX_SIDE = 1 << 16


@dataclass(frozen=True)
class ArraySize:
    """One crossbar: ``rows`` inputs (word lines) × ``cols`` outputs (bit lines)."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        for side in (self.rows, self.cols):
            if not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= MAX_SIDE:
                raise UsageError(
                    f"array size {self.rows}x{self.cols}: each side must be an integer in 1..{MAX_SIDE}"
                )

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


def parse_array(value: str | tuple[int, int] | ArraySize) -> ArraySize:
    """``256x256`` (or ``256×256``, or a (rows, cols) pair) → ArraySize; anything else a UsageError."""
    if isinstance(value, ArraySize):
        return value
    if isinstance(value, tuple | list) and len(value) == 2:
        return ArraySize(*value)
    text = str(value).strip().lower().replace("×", "x")
    rows, sep, cols = text.partition("x")
    if not sep or not rows.strip().isdigit() or not cols.strip().isdigit():
        raise UsageError(f"array size '{value}': give ROWSxCOLS, e.g. 256x256")
    return ArraySize(int(rows), int(cols))


@dataclass(frozen=True)
class Geometry:
    """A layer as the arrays see it. Matrices (Gemm/MatMul) have kernel (1, 1), out_size (1, positions)
    and ``window=False``. Channels are per group."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    out_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    batch: int = 1
    window: bool = True  # whether parallel windows apply (2-D or 1-D convolutions)

    @property
    def rows(self) -> int:
        return self.in_channels * self.kernel[0] * self.kernel[1]

    @property
    def cols(self) -> int:
        return self.out_channels

    @property
    def reuse(self) -> int:
        """Matrix–vector products per inference: N·Hout·Wout for a conv, M for a matrix."""
        return self.batch * self.out_size[0] * self.out_size[1]


@dataclass(frozen=True)
class Window:
    """A parallel window: PWh×PWw input pixels × ICt channels in, oh·ow positions × OCt channels out."""

    height: int
    width: int
    in_channels: int
    out_channels: int
    outputs: tuple[int, int]  # (oh, ow)
    cycles: int  # per group and image

    def __str__(self) -> str:
        return f"{self.height}x{self.width}x{self.in_channels}x{self.out_channels}"


def arrays_needed(rows: int, cols: int, array: ArraySize, groups: int = 1) -> int:
    return groups * math.ceil(rows / array.rows) * math.ceil(cols / array.cols)


def utilization(rows: int, cols: int, array: ArraySize, groups: int = 1) -> float:
    """Logical cells ÷ physical cells of the arrays used."""
    return groups * rows * cols / (arrays_needed(rows, cols, array, groups) * array.cells)


def im2col_cycles(geometry: Geometry, array: ArraySize) -> int:
    tiles = arrays_needed(geometry.rows, geometry.cols, array)
    return geometry.groups * geometry.reuse * tiles


def _span(outputs: int, kernel: int, stride: int, dilation: int) -> int:
    """Distinct input rows (or columns) that ``outputs`` neighbouring positions read."""
    if dilation == 1:
        return (outputs - 1) * stride + kernel if stride <= kernel else outputs * kernel
    return len({a * stride + b * dilation for a in range(outputs) for b in range(kernel)})


def _im2col_window(geometry: Geometry, array: ArraySize) -> Window:
    g = geometry
    per_image = g.out_size[0] * g.out_size[1] * arrays_needed(g.rows, g.cols, array)
    return Window(g.kernel[0], g.kernel[1], g.in_channels, g.out_channels, (1, 1), per_image)


def sdk_window(geometry: Geometry, array: ArraySize) -> Window:
    """The SDK paper's square window (see the module docstring)."""
    g = geometry
    best = _im2col_window(g, array)
    if not g.window:
        return best
    row_tiles, col_tiles = math.ceil(g.rows / array.rows), math.ceil(g.cols / array.cols)
    rows, cols = row_tiles * array.rows, col_tiles * array.cols
    for i in range(2, max(g.out_size) + 1):
        oh, ow = min(i, g.out_size[0]), min(i, g.out_size[1])
        height = _span(oh, g.kernel[0], g.stride[0], g.dilation[0])
        width = _span(ow, g.kernel[1], g.stride[1], g.dilation[1])
        if height * width * g.in_channels > rows or oh * ow * g.out_channels > cols:
            break
        count = math.ceil(g.out_size[0] / oh) * math.ceil(g.out_size[1] / ow) * row_tiles * col_tiles
        if count <= best.cycles:
            best = Window(height, width, g.in_channels, g.out_channels, (oh, ow), count)
    return best


def vwsdk_window(geometry: Geometry, array: ArraySize) -> Window:
    """The VW-SDK paper's variable window with tiled channels, or im2col when that is cheaper."""
    g = geometry
    im2col = _im2col_window(g, array)
    if not g.window:
        return im2col
    best: Window | None = None
    heights = [_span(oh, g.kernel[0], g.stride[0], g.dilation[0]) for oh in range(1, g.out_size[0] + 1)]
    for ow in range(1, g.out_size[1] + 1):
        width = _span(ow, g.kernel[1], g.stride[1], g.dilation[1])
        if width > array.rows or ow > array.cols:
            break
        for oh in range(1, g.out_size[0] + 1):
            height = heights[oh - 1]
            in_tile = min(g.in_channels, array.rows // (height * width))
            out_tile = min(g.out_channels, array.cols // (oh * ow))
            if in_tile == 0 or out_tile == 0:
                break  # a taller window reads more rows and writes more columns
            count = (
                math.ceil(g.out_size[0] / oh)
                * math.ceil(g.out_size[1] / ow)
                * math.ceil(g.in_channels / in_tile)
                * math.ceil(g.out_channels / out_tile)
            )
            if best is None or count < best.cycles:
                best = Window(height, width, in_tile, out_tile, (oh, ow), count)
    return im2col if best is None or im2col.cycles < best.cycles else best


def window(geometry: Geometry, array: ArraySize, mapping: str) -> Window:
    if mapping == "im2col":
        return _im2col_window(geometry, array)
    if mapping == "sdk":
        return sdk_window(geometry, array)
    if mapping == "vwsdk":
        return vwsdk_window(geometry, array)
    raise UsageError(f"mapping '{mapping}': choose one of {', '.join(MAPPINGS)} or all")


def cycles(geometry: Geometry, array: ArraySize, mapping: str) -> int:
    """Computing cycles for the whole output map of one inference (all groups, the whole batch)."""
    return geometry.groups * geometry.batch * window(geometry, array, mapping).cycles
