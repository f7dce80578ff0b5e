"""Crossbar costs for the rank allocator (`planning.allocate.CostModel`): arrays and computing cycles.

A layer y = W x with W m×n is an n-row × m-column crossbar matrix (rows are inputs). At rank r the pair
is two matrices, n×r then r×m (for a Conv: the k×k conv at r outputs, then a 1×1 conv), so

- arrays: dense ⌈n/AR⌉·⌈m/AC⌉; rank r ⌈n/AR⌉·⌈r/AC⌉ + ⌈r/AR⌉·⌈m/AC⌉. The cost is a step function of r:
  ranks that fill the array columns (r a multiple of AC, and of AR for the second factor's rows) buy
  their extra singular values for free, which the allocator's hull sees without being told.
- cycles: each factor's cycles (`lrdeploy.imc.mapping.cycles`) at the layer's ``positions``. im2col needs
  only `LayerShape`; SDK and VW-SDK need the convolution's window (kernel, strides, output size), which
  `ConvLayerShape` adds. A plain `LayerShape` is costed as a matrix (every mapping is im2col then).

Blocks (`lrdeploy.passes.lowrank_grouped`): a layer of G blocks of n×m (``blocks``) maps its first
factor as a grouped conv, G independent n×r matrices; the second is G r×m matrices for a grouped conv
of the model (``split_outputs``) and one G·r×m matrix for group low rank, whose dense layer is one
G·n×m matrix.

``arrays_costing`` / ``cycles_costing`` are the budget's ``--cost imc-arrays`` / ``imc-cycles``
(`lrdeploy.planning.costmodels.COSTS`): every layer's geometry from the model at its resolved input
shapes, the total from the whole dense model's mapping (layers no candidate covers are fixed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lrdeploy.errors import UsageError
from lrdeploy.imc.mapping import MAPPINGS, ArraySize, Geometry, arrays_needed, cycles, parse_array
from lrdeploy.planning.allocate import LayerShape

if TYPE_CHECKING:
    from lrdeploy.planning.costmodels import CostContext, Costing
    from lrdeploy.planning.plan import Analysis

__all__ = [
    "ConvLayerShape",
    "ImcArraysCost",
    "ImcCyclesCost",
    "arrays_costing",
    "cycles_costing",
    "factor_geometries",
    "imc_shapes",
]


@dataclass(frozen=True)
class ConvLayerShape(LayerShape):
    """A LayerShape with what the parallel-window mappings need: n = Cin·kh·kw, m = Cout, and
    ``positions`` = batch·Hout·Wout (the batch is positions ÷ Π out_size)."""

    kernel: tuple[int, int] = (1, 1)
    out_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    blocks: int = 1  # G blocks of m×n (grouped conv or group low rank)
    split_outputs: bool = False  # each block has its own outputs (a grouped conv of the model)
    window: bool = True  # parallel windows apply (1-D/2-D convs)

    def __post_init__(self) -> None:
        taps, spots = math.prod(self.kernel), math.prod(self.out_size)
        if self.n % taps or self.positions % spots:
            raise ValueError(f"{self}: n must be a multiple of Πkernel and positions of Π out_size")


def _conv(shape: ConvLayerShape, rows: int, cols: int, groups: int, kernel: bool) -> Geometry:
    """A conv factor: ``rows`` per group (Cin/G·Πk, or the r inputs of the 1×1), ``cols`` per group."""
    batch = shape.positions // math.prod(shape.out_size)
    if not kernel:
        return Geometry(rows, cols, (1, 1), shape.out_size, groups=groups, batch=batch, window=shape.window)
    taps = math.prod(shape.kernel)
    return Geometry(
        rows // taps,
        cols,
        shape.kernel,
        shape.out_size,
        shape.stride,
        shape.dilation,
        groups,
        batch,
        shape.window,
    )


def factor_geometries(shape: LayerShape, rank: int | None) -> list[Geometry]:
    """The dense layer, or the two factors of the rank-``rank`` pair (per block), as the arrays see them."""
    if not isinstance(shape, ConvLayerShape):
        if rank is None:
            return [Geometry(shape.n, shape.m, out_size=(1, shape.positions), window=False)]
        return [
            Geometry(shape.n, rank, out_size=(1, shape.positions), window=False),
            Geometry(rank, shape.m, out_size=(1, shape.positions), window=False),
        ]
    g, split = shape.blocks, shape.split_outputs
    if rank is None:
        return [
            _conv(shape, shape.n, shape.m, g, True) if split else _conv(shape, g * shape.n, shape.m, 1, True)
        ]
    second = _conv(shape, rank, shape.m, g, False) if split else _conv(shape, g * rank, shape.m, 1, False)
    return [_conv(shape, shape.n, rank, g, True), second]


@dataclass(frozen=True)
class ImcArraysCost:
    """Crossbar arrays holding the layer's weights (weight-stationary: every tile on its own array)."""

    array: ArraySize | str | tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "array", parse_array(self.array))

    def cost(self, shape: LayerShape, rank: int | None) -> float:
        return float(
            sum(arrays_needed(g.rows, g.cols, self.array, g.groups) for g in factor_geometries(shape, rank))
        )


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


def imc_shapes(analyses: Sequence[Analysis], context: CostContext) -> dict[str, LayerShape]:
    """Each layer's shape for the crossbar costs: its Conv window from the model at the resolved input
    shapes (`lrdeploy.imc.report.geometry_of`), or a matrix at its positions (Gemm, MatMul)."""
    from lrdeploy.imc.report import prepared, shape_of
    from lrdeploy.planning.costmodels import layer_positions, unknown_dims

    nodes, tensor_shapes, constants = prepared(context.original, context.input_shapes)
    shapes: dict[str, LayerShape] = {}
    for analysis in analyses:
        view = analysis.group.view
        found = shape_of(analysis, nodes, tensor_shapes, constants)
        if found is None:
            plain = layer_positions(analysis, context.macs)
            if plain is None:
                raise unknown_dims(f"the crossbar geometry of layer '{analysis.name}'")
            found = LayerShape(view.m, view.n, max(1, plain.positions // view.blocks))
        shapes[analysis.name] = found
    return shapes


def _costing(analyses: Sequence[Analysis], context: CostContext, model, unit: str, total_of) -> Costing:
    from lrdeploy.imc.report import map_graph
    from lrdeploy.planning.costmodels import Costing

    config = context.config
    if context.original is None:
        raise UsageError(f"the {unit} cost needs the model's layers; it runs inside compress")
    array = parse_array(config.imc_array)
    mapped = map_graph(context.original, array, [config.imc_mapping], context.input_shapes, "model")
    if not mapped.layers:
        raise UsageError("the model has no Conv, Gemm or MatMul with a constant weight to map onto crossbars")
    total = float(total_of(mapped.total(array)))
    notes = [f"{unit} on {array} arrays" + (f", {config.imc_mapping} mapping" if unit == "cycles" else "")]
    return Costing(model, imc_shapes(analyses, context), total, unit, notes=notes)


def arrays_costing(analyses: Sequence[Analysis], context: CostContext) -> Costing:
    """``--cost imc-arrays``: crossbar arrays of ``--imc-array`` size."""
    if context.config.imc_array is None:
        raise UsageError("--cost imc-arrays needs --imc-array RxC")
    model = ImcArraysCost(context.config.imc_array)
    return _costing(analyses, context, model, "arrays", lambda total: total["arrays"])


def cycles_costing(analyses: Sequence[Analysis], context: CostContext) -> Costing:
    """``--cost imc-cycles``: computing cycles under ``--imc-mapping``."""
    config = context.config
    if config.imc_array is None:
        raise UsageError("--cost imc-cycles needs --imc-array RxC")
    model = ImcCyclesCost(config.imc_array, config.imc_mapping)
    return _costing(analyses, context, model, "cycles", lambda total: total["cycles"][config.imc_mapping])
