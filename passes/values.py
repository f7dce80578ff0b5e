"""Constant values that are read when needed and not kept.

``gs.Constant.values`` caches what it loads; for a weight read from its file that keeps a second copy
alive until the cyclic garbage collector runs (graphsurgeon tensors and their consumer lists form
reference cycles). Passes that only read a weight to compute a new one use `read_values` instead.

`ScaledValues` goes one step further for BN folding: the folded weight ``W · s`` is computed each time
it is read, from the (still file-backed) source. Folding a ResNet-50 would otherwise hold a second copy
of every conv weight until factorization replaces it; this way only the layer being factorized is in
memory. Before export, `materialize_deferred` turns the ones still in the graph into arrays, because
graphsurgeon exports a LazyValues' source tensor as is.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

__all__ = ["ScaledValues", "float_dtype", "materialize_deferred", "read_values", "type_name"]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def type_name(tensor: gs.Tensor) -> str:
    """The element type's name, also for types numpy has no dtype for (bfloat16, float8: ONNX enums)."""
    try:
        return np.dtype(tensor.dtype).name
    except TypeError:
        return onnx.helper.tensor_dtype_to_string(int(tensor.dtype)).removeprefix("TensorProto.").lower()


def float_dtype(tensor: gs.Tensor) -> bool:
    """True for float16/32/64, the types the passes compute with in numpy."""
    try:
        return np.dtype(tensor.dtype) in _FLOATS
    except TypeError:
        return False


def read_values(constant: gs.Constant) -> np.ndarray:
    stored = constant._values
    return stored.load() if isinstance(stored, LazyValues) else stored


class ScaledValues(LazyValues):
    """``source · multiplier`` (broadcast), computed in float64 on every read and cast to the source dtype."""

    def __init__(self, source: gs.Constant, multiplier: np.ndarray) -> None:
        self.source = source
        self.multiplier = multiplier
        self.tensor = None
        self.shape = tuple(source.shape)
        self.dtype = np.dtype(source.dtype)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        return np.ascontiguousarray((read_values(self.source) * self.multiplier).astype(self.dtype))

    def __str__(self) -> str:
        return f"ScaledValues(source={self.source.name}, shape={self.shape})"


def materialize_deferred(graph: gs.Graph) -> int:
    """Replace ScaledValues still in the graph by their arrays; returns how many there were."""
    count = 0
    for tensor in graph.tensors().values():
        if isinstance(getattr(tensor, "_values", None), ScaledValues):
            tensor._values = tensor._values.load()
            count += 1
    return count
