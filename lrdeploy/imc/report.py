"""Walk a model and map every layer with a constant weight onto crossbars (`lrdeploy.imc.mapping`).

Mapped: Conv (1-D/2-D get parallel windows; 3-D and up im2col only), Gemm, and MatMul whose second
input is a constant 2-D matrix. A factorized pair from ``lrdeploy compress`` is two such nodes, so each
factor is mapped on its own. Shapes come from onnx shape inference at the given (or guessed) input
shapes (`lrdeploy.planning.costs.infer_shapes`); weights are never read, only their dims.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from lrdeploy.errors import UsageError
from lrdeploy.imc.mapping import MAPPINGS, ArraySize, Geometry, arrays_needed, parse_array, window
from lrdeploy.io.modelio import load_model
from lrdeploy.passes.inline import inline_layer_functions
from lrdeploy.passes.names import name_nodes
from lrdeploy.passes.upgrade import upgrade_opset
from lrdeploy.planning import costs
from lrdeploy.report import strict_json
from lrdeploy.runtime.inputs import resolve_shapes

__all__ = [
    "SCHEMA_VERSION",
    "ImcLayer",
    "ImcReport",
    "ModelMap",
    "geometry_of",
    "map_graph",
    "map_model",
    "parse_mappings",
]

SCHEMA_VERSION = 1
_OPS = ("Conv", "Gemm", "MatMul")

Shapes = Mapping[str, tuple[int | None, ...]]


@dataclass(frozen=True)
class ImcLayer:
    name: str
    op: str
    rows: int  # per group
    cols: int  # per group
    groups: int
    arrays: int
    utilization: float
    reuse: int
    cycles: dict[str, int]
    windows: dict[str, str]  # mapping → parallel window PWh×PWw×ICt×OCt

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "rows": self.rows,
            "cols": self.cols,
            "groups": self.groups,
            "arrays": self.arrays,
            "utilization": self.utilization,
            "reuse": self.reuse,
            "cycles": dict(self.cycles),
            "windows": dict(self.windows),
        }


@dataclass(frozen=True)
class ModelMap:
    """One model's layers on the arrays, and what was left off (name, op, why)."""

    model: str
    layers: list[ImcLayer]
    skipped: list[tuple[str, str, str]]
    input_shapes: dict[str, list[int] | None]

    def total(self, array: ArraySize) -> dict:
        logical = sum(layer.groups * layer.rows * layer.cols for layer in self.layers)
        arrays = sum(layer.arrays for layer in self.layers)
        mappings = self.layers[0].cycles.keys() if self.layers else ()
        return {
            "layers": len(self.layers),
            "arrays": arrays,
            "cells": logical,
            "utilization": logical / (arrays * array.cells) if arrays else None,
            "reuse": sum(layer.reuse for layer in self.layers),
            "cycles": {m: sum(layer.cycles[m] for layer in self.layers) for m in mappings},
        }

    def to_dict(self, array: ArraySize) -> dict:
        return {
            "model": self.model,
            "input_shapes": self.input_shapes,
            "layers": [layer.to_dict() for layer in self.layers],
            "total": self.total(array),
            "skipped": [{"name": n, "op": op, "reason": why} for n, op, why in self.skipped],
        }


@dataclass
class ImcReport:
    """The mapping of MODEL (and of COMPRESSED, when given); ``simulation`` is filled by --simulate."""

    array: ArraySize
    mappings: tuple[str, ...]
    models: list[ModelMap]
    simulation: dict | None = field(default=None)

    @property
    def layers(self) -> list[ImcLayer]:
        return self.models[0].layers

    def total(self) -> dict:
        return self.models[0].total(self.array)

    def to_dict(self) -> dict:
        first = self.models[0].to_dict(self.array)
        document = {"schema_version": SCHEMA_VERSION, "array": [self.array.rows, self.array.cols]}
        document |= {"mappings": list(self.mappings), **first}
        if len(self.models) > 1:
            document["compressed"] = self.models[1].to_dict(self.array)
        if self.simulation is not None:
            document["simulation"] = self.simulation
        return document

    def to_json(self) -> str:
        return strict_json(self.to_dict())


def _ints(node: onnx.NodeProto, name: str, default: Sequence[int]) -> tuple[int, ...]:
    attr = next((a for a in node.attribute if a.name == name), None)
    return tuple(attr.ints) if attr is not None and attr.ints else tuple(default)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    return (1, values[0]) if len(values) == 1 else (values[0], values[1])


def geometry_of(node: onnx.NodeProto, shapes: Shapes, constants: set[str]) -> Geometry | str:
    """The node as the arrays see it, or why it cannot be mapped."""
    if len(node.input) < 2 or node.input[1] not in constants:
        return "the weight is not a constant"
    weight = shapes.get(node.input[1])
    if not _known(weight):
        return "the weight's shape is unknown"
    output = shapes.get(node.output[0])
    if node.op_type == "Conv":
        spatial = len(weight) - 2
        if spatial < 1 or not _known(output) or len(output) != len(weight):
            return "the output shape is unknown (pass --input-shape)"
        groups = _attr(node, "group", 1)
        if groups < 1 or weight[0] % groups:
            return f"group {groups} does not divide the {weight[0]} output channels"
        kernel, out = weight[2:], output[2:]
        if spatial > 2:  # no parallel window: positions flattened, kernel taps in the rows
            cin = weight[1] * math.prod(kernel)
            return Geometry(cin, weight[0] // groups, (1, 1), (1, math.prod(out)), groups=groups,
                            batch=output[0], window=False)  # fmt: skip
        ones = (1,) * spatial
        return Geometry(
            weight[1],
            weight[0] // groups,
            _pair(kernel),
            _pair(out),
            _pair(_ints(node, "strides", ones)),
            _pair(_ints(node, "dilations", ones)),
            groups,
            output[0],
        )
    if not _known(output):
        return "the output shape is unknown (pass --input-shape)"
    if len(weight) != 2:
        return f"the weight has {len(weight)} dims; only a 2-D weight maps onto one matrix"
    if node.op_type == "Gemm":
        k, n = (weight[1], weight[0]) if _attr(node, "transB", 0) else weight
        return Geometry(k, n, out_size=(1, output[0]), window=False)
    k, n = weight
    return Geometry(k, n, out_size=(1, math.prod(output[:-1])), window=False)


def _constants(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    return names | {o for node in model.graph.node if node.op_type == "Constant" for o in node.output}


def _named(model: onnx.ModelProto, input_shapes) -> tuple[onnx.ModelProto, dict, Shapes, set[str]]:
    """The model as compress names it, its resolved input shapes, every tensor's shape, its constants."""
    model, _ = inline_layer_functions(upgrade_opset(model)[0])
    name_nodes(model.graph)  # the names compress gives
    given = resolve_shapes(model, input_shapes, strict=False)
    return model, given, costs.infer_shapes(model, given), _constants(model)


def prepared(
    model: onnx.ModelProto | None, input_shapes
) -> tuple[dict[str, onnx.NodeProto], Shapes, set[str]]:
    """Nodes by name, tensor shapes and constants of ``model`` (compress's original) for `shape_of`."""
    if model is None:
        return {}, {}, set()
    model, _, shapes, constants = _named(model, input_shapes)
    return {node.name: node for node in model.graph.node}, shapes, constants


def shape_of(analysis, nodes: Mapping[str, onnx.NodeProto], shapes: Shapes, constants: set[str]):
    """A planned layer as `lrdeploy.imc.costs` prices it (its readers' positions summed), or None when
    its geometry is not known from the model."""
    from lrdeploy.imc.costs import ConvLayerShape
    from lrdeploy.planning.allocate import LayerShape

    view = analysis.group.view
    found = [nodes.get(node.name) for node in analysis.group.nodes]
    geometries = [geometry_of(node, shapes, constants) if node is not None else "" for node in found]
    if any(isinstance(g, str) for g in geometries):
        return None
    first = geometries[0]
    positions = sum(g.reuse for g in geometries)
    if view.layout[0] not in ("Conv", "GroupedConv"):
        return LayerShape(view.m, view.n, positions)
    if any(g.out_size != first.out_size for g in geometries):
        return None
    split = bool(view.layout[3]) if view.layout[0] == "GroupedConv" else False
    if not first.window:
        return ConvLayerShape(view.m, view.n, positions, out_size=first.out_size, blocks=view.blocks,
                              split_outputs=split, window=False)  # fmt: skip
    return ConvLayerShape(
        view.m,
        view.n,
        positions,
        first.kernel,
        first.out_size,
        first.stride,
        first.dilation,
        view.blocks,
        split,
    )


def map_graph(
    model: onnx.ModelProto,
    array: ArraySize,
    mappings: Sequence[str],
    input_shapes: Mapping[str, tuple[int, ...]] | None,
    label: str,
) -> ModelMap:
    model, given, shapes, constants = _named(model, input_shapes)
    layers, skipped = [], []
    for node in model.graph.node:
        if node.op_type not in _OPS or node.domain not in ("", "ai.onnx"):
            continue
        geometry = geometry_of(node, shapes, constants)
        if isinstance(geometry, str):
            skipped.append((node.name, node.op_type, geometry))
            continue
        g = geometry
        windows = {m: window(g, array, m) for m in mappings}
        arrays = arrays_needed(g.rows, g.cols, array, g.groups)
        layers.append(
            ImcLayer(
                node.name,
                node.op_type,
                g.rows,
                g.cols,
                g.groups,
                arrays,
                g.groups * g.rows * g.cols / (arrays * array.cells),
                g.reuse,
                {m: g.groups * g.batch * w.cycles for m, w in windows.items()},
                {m: str(w) if g.window else "-" for m, w in windows.items()},
            )
        )
    shown = {name: list(shape) if shape else None for name, shape in given.items()}
    return ModelMap(label, layers, skipped, shown)


def parse_mappings(mappings: str | Sequence[str]) -> tuple[str, ...]:
    chosen = [mappings] if isinstance(mappings, str) else list(mappings)
    chosen = [m for value in chosen for m in (MAPPINGS if value == "all" else (value,))]
    unknown = [m for m in chosen if m not in MAPPINGS]
    if unknown or not chosen:
        raise UsageError(f"mapping {unknown or chosen}: choose from {', '.join(MAPPINGS)} or all")
    return tuple(dict.fromkeys(chosen))


def map_model(
    model: str | os.PathLike | onnx.ModelProto,
    compressed: str | os.PathLike | onnx.ModelProto | None = None,
    *,
    array: str | tuple[int, int] | ArraySize = (256, 256),
    mappings: str | Sequence[str] = MAPPINGS,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> ImcReport:
    """Map ``model`` (and ``compressed``) onto ``array``-sized crossbars; nothing is written.

    Raises UsageError when a model has no layer with a constant weight to map.
    """
    size = parse_array(array)
    chosen = parse_mappings(mappings)
    maps = []
    for index, source in enumerate(m for m in (model, compressed) if m is not None):
        loaded, path = load_model(source)
        label = str(path) if path else ("the given model" if index == 0 else "the compressed model")
        mapped = map_graph(loaded, size, chosen, input_shapes, label)
        if not mapped.layers:
            why = f" ({mapped.skipped[0][2]}: {mapped.skipped[0][0]})" if mapped.skipped else ""
            raise UsageError(
                f"{label} has no Conv, Gemm or MatMul with a constant weight to map{why}; "
                "pass a model with such layers"
            )
        maps.append(mapped)
    return ImcReport(size, chosen, maps)


def compressed_table(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    array: str,
    input_shapes: Mapping[str, tuple[int, ...] | None],
    decisions: Sequence = (),
) -> ImcReport | str:
    """``compress --imc-array``: the dense and the compressed model on the arrays (every mapping), and
    for each group low-rank layer the arrays and cycles of its pair and of plain low rank at the same
    rank and at the same parameter count (written into the decision's ``group_compare``). A string says
    why nothing could be mapped."""
    from lrdeploy.imc.costs import ConvLayerShape, ImcArraysCost, ImcCyclesCost, factor_geometries

    size = parse_array(array)
    maps = [
        map_graph(model, size, MAPPINGS, input_shapes, label)
        for model, label in ((original, "dense"), (compressed, "compressed"))
    ]
    if not maps[0].layers:
        why = f" ({maps[0].skipped[0][2]}: {maps[0].skipped[0][0]})" if maps[0].skipped else ""
        return f"no Conv, Gemm or MatMul with a constant weight could be mapped onto the arrays{why}"
    nodes, shapes, constants = prepared(original, input_shapes)
    for decision in decisions:
        compare = decision.group_compare
        node = nodes.get(decision.name)
        geometry = geometry_of(node, shapes, constants) if compare is not None and node is not None else ""
        if isinstance(geometry, str) or not geometry.window:
            continue
        g, blocks = geometry, int(compare["groups"])
        common = (g.reuse, g.kernel, g.out_size, g.stride, g.dilation)
        grouped = ConvLayerShape(decision.m, decision.n, *common, blocks=blocks)
        plain = ConvLayerShape(decision.m, decision.n * blocks, *common)
        for key, shape in (("", grouped), ("plain_same_rank", plain), ("plain_same_params", plain)):
            entry = compare if not key else compare[key]
            rank = int(entry["rank"])
            entry["arrays"] = int(ImcArraysCost(size).cost(shape, rank))
            entry["cycles"] = {m: int(ImcCyclesCost(size, m).cost(shape, rank)) for m in MAPPINGS}
            entry["utilization"] = sum(f.groups * f.rows * f.cols for f in factor_geometries(shape, rank)) / (
                entry["arrays"] * size.cells
            )
    return ImcReport(size, MAPPINGS, maps)
