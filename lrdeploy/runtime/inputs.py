"""The model's real inputs, their concrete shapes, and seeded random feeds for them.

Exported models leave dims symbolic (``batch``, ``sequence``). A leading symbolic dim is taken as the
batch and set to 1; any other must come from ``--input-shape NAME:d0,d1,...`` or from another input
that names the same symbol, otherwise the error names the dims that cannot be guessed.

Integer inputs that index a constant table get random indices within it; what random data cannot choose
(a sample rate that selects a branch) is given as a constant (`lrdeploy.runtime.feeding`).

Declared shapes are untrusted: a 1 KB model may declare an input of ``[1, 10000, 10000, 4]``. Random
feeds are sized in Python integers before anything is allocated, and refused over `MAX_RANDOM_BYTES`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from lrdeploy.errors import UsageError
from lrdeploy.passes.scopes import body_graphs, scoped_nodes
from lrdeploy.spelling import either, option

__all__ = [
    "MAX_RANDOM_BYTES",
    "InputSpec",
    "check_random_size",
    "format_dims",
    "model_inputs",
    "random_feeds",
    "resolve_shapes",
]

Dim = int | str | None
#: Random inputs of one batch, all inputs together.
MAX_RANDOM_BYTES = 256 << 20


@dataclass(frozen=True)
class InputSpec:
    name: str
    elem_type: int  # onnx.TensorProto data type; 0 for non-tensor inputs
    dims: tuple[Dim, ...] | None  # None when the rank is unknown

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))


def _dims(value_type: onnx.TypeProto) -> tuple[Dim, ...] | None:
    if not value_type.tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for dim in value_type.tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or None)
    return tuple(dims)


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that are fed at run time (old exports also list their initializers as inputs)."""
    weights = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in weights:
            continue
        elem_type = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
        specs.append(InputSpec(value.name, elem_type, _dims(value.type)))
    return specs


def _check_given(specs: list[InputSpec], given: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Validate user shapes against the model and return the symbol values they fix."""
    by_name = {spec.name: spec for spec in specs}
    symbols: dict[str, int] = {}
    for name, shape in given.items():
        spec = by_name.get(name)
        if spec is None:
            known = ", ".join(by_name) or "(none)"
            raise UsageError(
                f"unknown input '{name}' in {option('input_shapes')}; the model's inputs are: {known}"
            )
        if spec.dims is None:
            continue
        if len(shape) != len(spec.dims):
            raise UsageError(
                f"{option('input_shapes')} {name} has {len(shape)} dims but the model's input has "
                f"{len(spec.dims)}: "
                f"{format_dims(spec.dims)}"
            )
        for index, (model_dim, user_dim) in enumerate(zip(spec.dims, shape, strict=True)):
            if isinstance(model_dim, int) and model_dim != user_dim:
                raise UsageError(
                    f"{option('input_shapes')} {name}: dim {index} is fixed to {model_dim} in the model, "
                    f"got {user_dim}"
                )
            if isinstance(model_dim, str):
                symbols.setdefault(model_dim, user_dim)
    return symbols


def shape_hint(name: str, dims: str) -> str:
    """How to give an input's shape: ``--input-shape x:1,64`` in a shell, ``input_shapes={'x': (1, 64)}``."""
    return either(f"--input-shape {name}:{dims}", f"input_shapes={{{name!r}: ({dims})}}")


def format_dims(dims: tuple[Dim, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def resolve_shapes(
    model: onnx.ModelProto, given: Mapping[str, tuple[int, ...]] | None = None, *, strict: bool = True
) -> dict[str, tuple[int, ...] | None]:
    """Concrete shapes for every input. With ``strict=False`` an unguessable input maps to None.

    ``strict`` is for shapes that random inputs will be made at (`random_feeds`): every dim must be
    known, and the feeds must fit `MAX_RANDOM_BYTES`, which is checked here, before any work is done.
    """
    specs = model_inputs(model)
    given = dict(given or {})
    symbols = _check_given(specs, given)
    for spec in specs:  # batch symbols first, so that inputs listed earlier can use them too
        if spec.name not in given and spec.dims and isinstance(spec.dims[0], str):
            symbols.setdefault(spec.dims[0], 1)
    shapes: dict[str, tuple[int, ...] | None] = {}
    for spec in specs:
        if spec.name in given:
            shapes[spec.name] = tuple(given[spec.name])
            continue
        if spec.dims is None:
            if strict:
                raise UsageError(
                    f"input '{spec.name}' has no known rank; pass {shape_hint(spec.name, 'd0,d1,...')}"
                )
            shapes[spec.name] = None
            continue
        resolved, missing = [], []
        for index, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                resolved.append(dim)
            elif dim is not None and dim in symbols:
                resolved.append(symbols[dim])
            elif index == 0:
                resolved.append(1)
                if dim is not None:
                    symbols[dim] = 1
            else:
                missing.append(f"dim {index} ({dim or 'unnamed'})")
        if missing:
            if strict:
                example = ",".join(
                    str(d) if isinstance(d, int) else "1" if i == 0 else "64" for i, d in enumerate(spec.dims)
                )
                raise UsageError(
                    f"cannot guess {', '.join(missing)} of input '{spec.name}' {format_dims(spec.dims)}; "
                    f"pass e.g. {shape_hint(spec.name, example)} with 64 replaced by the real size"
                )
            shapes[spec.name] = None
            continue
        shapes[spec.name] = tuple(resolved)
    if strict:
        check_random_size(specs, shapes)
    return shapes


#: Ops that pass integer indices on unchanged in value (shape or type only).
_INDEX_PASSTHROUGH = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand")


def _tables(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Constant tensors' dims: initializers and Constant nodes, in every body too."""
    dims = {t.name: list(t.dims) for t in graph.initializer}
    for node in scoped_nodes(graph):
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            dims[node.output[0]] = list(node.attribute[0].t.dims)
        for _, body in body_graphs(node):
            dims.update((t.name, list(t.dims)) for t in body.initializer)
    return dims


def _index_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """For integer inputs that index a constant table (Gather of embeddings), the table's size.

    The indices may reach the Gather through casts and reshapes, or inside an If/Loop/Scan body.
    """
    tables = _tables(model.graph)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in scoped_nodes(model.graph):
        for name in node.input:
            readers.setdefault(name, []).append(node)
    ranges: dict[str, int] = {}
    for spec in model_inputs(model):
        todo, seen = [spec.name], {spec.name}
        while todo:
            tensor = todo.pop()
            for node in readers.get(tensor, ()):
                if (
                    node.op_type in _INDEX_PASSTHROUGH
                    and node.input[0] == tensor
                    and node.output[0] not in seen
                ):
                    seen.add(node.output[0])
                    todo.append(node.output[0])
                elif node.op_type == "Gather" and node.input[1:2] == [tensor] and tables.get(node.input[0]):
                    dims = tables[node.input[0]]
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    size = dims[axis % len(dims)]
                    ranges[spec.name] = min(ranges.get(spec.name, size), size)
    return ranges


def _itemsize(spec: InputSpec) -> int:
    try:
        return spec.dtype.itemsize or 1
    except (TypeError, ValueError, KeyError):  # no numpy dtype (strings, bfloat16): refused when fed
        return 1


def check_random_size(specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...] | None]) -> None:
    """UsageError when random inputs at ``shapes`` would take more than MAX_RANDOM_BYTES."""
    sizes = {
        spec.name: math.prod(shapes[spec.name]) * _itemsize(spec)
        for spec in specs
        if shapes.get(spec.name) is not None
    }
    total = sum(sizes.values())
    if total <= MAX_RANDOM_BYTES:
        return
    name = max(sizes, key=sizes.__getitem__)
    shape = ",".join(map(str, shapes[name]))
    raise UsageError(
        f"random inputs would take {_mib(total)} (input '{name}' [{shape}] alone {_mib(sizes[name])}), over "
        f"the {_mib(MAX_RANDOM_BYTES)} limit; pass smaller sizes with {shape_hint(name, '...')} where the "
        f"model leaves dims open, or real inputs with {either('--data', 'data=...')}"
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB" if size < 2**40 else f"{size / 2**40:,.3g} TiB"


def random_feeds(
    model: onnx.ModelProto,
    shapes: Mapping[str, tuple[int, ...]],
    seed: int = 0,
    values: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal floats; integers in [0, table size) for embedding indices, the whole
    range for other 8-bit integers (pixels, quantized data), else 0/1. An input in ``values`` is that
    constant at its shape (a sample rate, a mode flag: what random data cannot choose)."""
    from lrdeploy.runtime.feeding import check_values, constant_feed  # feeding builds on this module

    rng = np.random.default_rng(seed)
    ranges = _index_ranges(model)
    feeds: dict[str, np.ndarray] = {}
    specs = model_inputs(model)
    check_random_size(specs, shapes)
    check_values(specs, values or {})
    for spec in specs:
        shape = shapes[spec.name]
        if values and spec.name in values:
            feeds[spec.name] = constant_feed(spec, values[spec.name], shape)
            continue
        if spec.elem_type == 0:
            raise UsageError(f"input '{spec.name}' is not a tensor; lrdeploy can only feed tensor inputs")
        if spec.elem_type == TensorProto.STRING:
            raise UsageError(
                f"input '{spec.name}' is a string tensor; feed real data instead of random inputs"
            )
        dtype = spec.dtype
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = np.asarray(rng.random(shape) < 0.5)  # rank 0: a numpy scalar otherwise
        elif dtype.itemsize == 1 and spec.name not in ranges:  # pixels, quantized values: the full range
            feeds[spec.name] = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, shape, dtype, True)
        else:
            feeds[spec.name] = rng.integers(0, ranges.get(spec.name, 2), size=shape).astype(dtype)
    return feeds
