"""The capture run of calibration: the model with layer inputs (or their Grams) as outputs, the static
shapes of those inputs for the fed shapes, and the runs themselves with one-line errors."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import Future

import numpy as np
import onnx
from onnx import helper

from lrdeploy.errors import UsageError

__all__ = ["concrete_shapes", "parallelism", "run_batch", "wait", "with_outputs"]

#: Initializers up to this many bytes go into the shape-inference copy (shape tensors); larger ones
#: become typed inputs, so that inference does not copy the weights.
_SMALL_INITIALIZER = 1 << 12


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model that also returns ``tensors`` (the input model is not changed)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in dict.fromkeys(tensors):
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy


def concrete_shapes(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray]
) -> dict[str, tuple[tuple[int | None, ...], int]]:
    """(shape, element type) of every tensor onnx shape inference resolves with the inputs fixed to the
    fed shapes; unknown dimensions are None. Empty when inference fails (the numpy path then serves)."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.output.extend(model.graph.output)
    initializers = set()
    for tensor in model.graph.initializer:
        initializers.add(tensor.name)
        if tensor.ByteSize() <= _SMALL_INITIALIZER:
            graph.initializer.append(tensor)
        else:
            graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    for value in model.graph.input:
        if value.name in initializers:
            continue
        array = feed.get(value.name)
        if array is None:
            return {}
        fixed = onnx.ValueInfoProto()
        fixed.CopyFrom(value)
        fixed.type.tensor_type.ClearField("shape")
        for size in np.shape(array):
            fixed.type.tensor_type.shape.dim.add().dim_value = int(size)
        graph.input.append(fixed)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # an uninferable model is served by the numpy path
        return {}
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        kind = value.type.tensor_type
        if not kind.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in kind.shape.dim)
        shapes[value.name] = (dims, kind.elem_type)
    return shapes


def parallelism() -> tuple[int, int]:
    """(layers accumulated at once, BLAS threads each).

    Layers go to their own threads on single-threaded BLAS: on a busy 2-core machine two-threaded
    OpenBLAS products of tall, narrow matrices ran 4–10× slower than one thread (threads wait on each
    other), and one layer at a time leaves the second core idle. At most 4 at a time, each holding a
    padded copy of its layer's input batch.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(4, cores))
    return workers, max(1, cores // workers)


def wait(futures: list[Future]) -> None:
    """Wait for all, then raise the first failure (the others finish rather than race the caller)."""
    for future in futures:
        future.exception()
    for future in futures:
        future.result()


def run_batch(session, names: list[str], feed: Mapping[str, np.ndarray], batch: int) -> list[np.ndarray]:
    try:
        return session.run(names, dict(feed)) if names else []
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"calibration batch {batch} does not fit the model ({message[:300]}); "
            "check its input names and shapes"
        ) from None
