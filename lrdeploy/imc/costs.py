"""Crossbar costs for the rank allocator (`planning.allocate.CostModel`): arrays and computing cycles.

A layer y = W x with W m×n is an n-row × m-column crossbar matrix (rows are inputs). At rank r the pair
is two matrices, n×r then r×m (for a Conv: the k×k conv at r outputs, then a 1×1 conv), so

- arrays: dense ⌈n/AR⌉·⌈m/AC⌉; rank r ⌈n/AR⌉·⌈r/AC⌉ + ⌈r/AR⌉·⌈m/AC⌉. The cost is a step function of r:
  ranks that fill the array columns (r a multiple of AC, and of AR for the second factor's rows) buy
  their extra singular values for free, which the allocator's hull sees without being told.
- cycles: each factor's cycles (`lrdeploy.imc.mapping.cycles`) at the layer's ``positions``. im2col needs
  only `LayerShape`; SDK and VW-SDK need the convolution's window (kernel, strides, output size), which
  `ConvLayerShape` adds. A plain `LayerShape` is costed as a matrix (every mapping is im2col then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lrdeploy.errors import UsageError
from lrdeploy.imc.mapping import MAPPINGS, ArraySize, Geometry, arrays_needed, cycles, parse_array
from lrdeploy.planning.allocate import LayerShape

__all__ = ["ConvLayerShape", "ImcArraysCost", "ImcCyclesCost", "factor_geometries"]


@dataclass(frozen=True)
class ConvLayerShape(LayerShape):
    """A LayerShape with what the parallel-window mappings need: n = Cin·kh·kw, m = Cout, and
    ``positions`` = batch·Hout·Wout (the batch is positions ÷ Π out_size)."""

    kernel: tuple[int, int] = (1, 1)
    out_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        taps, spots = math.prod(self.kernel), math.prod(self.out_size)
        if self.n % taps or self.positions % spots:
            raise ValueError(f"{self}: n must be a multiple of Πkernel and positions of Π out_size")


def _geometry(shape: LayerShape, cin: int, cout: int, first: bool) -> Geometry:
    if not isinstance(shape, ConvLayerShape):
        return Geometry(cin, cout, out_size=(1, shape.positions), window=False)
    batch = shape.positions // math.prod(shape.out_size)
    if first:  # the original conv: its kernel, strides and dilations, at the factor's outputs
        taps = math.prod(shape.kernel)
        return Geometry(
            cin // taps, cout, shape.kernel, shape.out_size, shape.stride, shape.dilation, 1, batch
        )
    return Geometry(cin, cout, (1, 1), shape.out_size, batch=batch)  # the 1×1 conv


def factor_geometries(shape: LayerShape, rank: int | None) -> list[Geometry]:
    """The dense layer, or the two factors of the rank-``rank`` pair, as the arrays see them."""
    if rank is None:
        return [_geometry(shape, shape.n, shape.m, first=True)]
    return [_geometry(shape, shape.n, rank, first=True), _geometry(shape, rank, shape.m, first=False)]


@dataclass(frozen=True)
class ImcArraysCost:
    """Crossbar arrays holding the layer's weights (weight-stationary: every tile on its own array)."""

    array: ArraySize | str | tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "array", parse_array(self.array))

    def cost(self, shape: LayerShape, rank: int | None) -> float:
        return float(sum(arrays_needed(g.rows, g.cols, self.array) for g in factor_geometries(shape, rank)))


@dataclass(frozen=True)
class ImcCyclesCost:
    """Computing cycles (array reads) for one inference under ``mapping`` (im2col, sdk or vwsdk)."""

    array: ArraySize | str | tuple[int, int]
    mapping: str = "im2col"

    def __post_init__(self) -> None:
        object.__setattr__(self, "array", parse_array(self.array))
        if self.mapping not in MAPPINGS:
            raise UsageError(f"mapping '{self.mapping}': choose one of {', '.join(MAPPINGS)}")

    def cost(self, shape: LayerShape, rank: int | None) -> float:
        return float(sum(cycles(g, self.array, self.mapping) for g in factor_geometries(shape, rank)))
