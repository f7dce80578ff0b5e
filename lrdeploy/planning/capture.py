"""The capture run of calibration: the model with layer inputs (or their Grams) as outputs, the static
shapes of those inputs for the fed shapes, and the runs themselves with one-line errors."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from lrdeploy.errors import UsageError
from lrdeploy.planning import gramgraph
from lrdeploy.planning.gramgraph import GramPlan, GraphBuilder
from lrdeploy.planning.moments import LayerMoments
from lrdeploy.planning.rowforms import LayerInput
from lrdeploy.runtime.sessions import Device, make_session

__all__ = ["Capture", "Grams", "concrete_shapes", "parallelism", "run_batch", "wait", "with_outputs"]

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


@dataclass
class Grams:
    """One batch's in-graph products of a layer, per part, and the samples each part took."""

    plan: GramPlan
    products: dict[str, list[np.ndarray]]
    masks: dict[str, np.ndarray]

    def add(self, moments: LayerMoments, x: np.ndarray | None) -> None:
        for part, moment in (("fit", moments.fit), ("holdout", moments.holdout)):
            mask = self.masks[part]
            if not mask.any():
                continue
            if self.plan.kind == "shift":
                assert x is not None
                samples = x[mask]
                gramgraph.fold_shifts(
                    self.plan, self.products[part], samples, moment.taps(self.plan.channels)
                )
            else:
                gramgraph.fold(self.plan, self.products[part], moment.upper(gramgraph.order(self.plan)))
            moment.count += int(mask.sum()) * self.plan.rows_per_sample


class Capture:
    """The capture session: layer inputs copied out for the numpy path, Grams for the others; rebuilt
    when a batch's shapes change what the graph computes."""

    def __init__(
        self,
        model: onnx.ModelProto,
        layers: list[LayerInput],
        every: int,
        threads: int | None,
        in_graph: bool,
        shift_channels: int,
    ) -> None:
        self.model, self.layers, self.every, self.threads = model, layers, every, threads
        self.shift_channels = shift_channels
        self.in_graph = in_graph and _opset(model) >= gramgraph.MIN_OPSET
        self.graph_inputs = {v.name for v in model.graph.input}
        self._key: object = None
        self._shapes: dict[tuple, dict] = {}
        self._outputs: dict[tuple, dict[str, np.ndarray]] = {}
        self.binding = REUSE_OUTPUTS
        self.plans: dict[str, GramPlan] = {}
        self.copied: list[str] = []

    def _shapes_for(self, feed: Mapping[str, np.ndarray]) -> tuple[tuple, dict]:
        signature = tuple(sorted((name, np.shape(value)) for name, value in feed.items()))
        if signature not in self._shapes:
            needed = self.in_graph or self.binding
            self._shapes[signature] = concrete_shapes(self.model, feed) if needed else {}
        return signature, self._shapes[signature]

    def _plans(self, feed: Mapping[str, np.ndarray]) -> tuple[dict[str, GramPlan], dict[str, int]]:
        if not self.in_graph:
            return {}, {}
        _, shapes = self._shapes_for(feed)
        plans, sizes = {}, {}
        for layer in self.layers:
            dims, kind = shapes.get(layer.tensor, ((), 0))
            if kind != TensorProto.FLOAT or not dims or dims[0] is None:
                continue
            plan = gramgraph.plan_layer(
                layer.node,
                layer.op,
                layer.tensor,
                layer.dim,
                layer.attrs,
                layer.kernel_shape,
                dims,
                self.shift_channels,
            )
            if plan is not None:
                plans[layer.node], sizes[layer.node] = plan, dims[0]
        return plans, sizes

    def _build(self, plans: dict[str, GramPlan]) -> None:
        copied = [
            layer.tensor
            for layer in self.layers
            if (layer.node not in plans or plans[layer.node].kind == "shift")
            and layer.tensor not in self.graph_inputs
        ]
        builder = GraphBuilder(with_outputs(self.model, copied))
        for plan in plans.values():
            builder.add(plan, ("fit", "holdout") if self.every else ("fit",))
        label = "the model with its layer inputs as outputs"
        # spinning off: the layers of the previous batch are summed on the same cores while it runs
        self.session = make_session(
            builder.model.SerializeToString(), Device("cpu"), self.threads, spinning=False, label=label
        )
        self.copied, self.plans = copied, plans

    def prepare(self, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Build the session for the feed's shapes unless the one built serves them; returns the batch
        size of every in-graph layer's input."""
        plans, sizes = self._plans(feed)
        key = tuple((node, repr(plan)) for node, plan in plans.items())
        if key != self._key:
            self._build(plans)
            self._key = key
        return sizes

    def run(
        self, feed: Mapping[str, np.ndarray], moments: Mapping[str, LayerMoments], batch: int
    ) -> tuple[dict[str, np.ndarray], dict[str, Grams]]:
        """One batch: copied layer inputs by tensor name, and the in-graph layers' products by node."""
        sizes = self.prepare(feed)
        full = dict(feed)
        masks: dict[str, dict[str, np.ndarray]] = {}
        for node, plan in self.plans.items():
            held = _held(moments[node], sizes[node], self.every)
            masks[node] = {"fit": ~held, "holdout": held}
            for part, index in plan.index.items():
                chosen = np.flatnonzero(masks[node][part])
                full[index] = chosen if chosen.size else np.zeros(1, np.int64)  # a part without samples
        names = self.copied + [
            name for plan in self.plans.values() for part in plan.outputs.values() for name in part
        ]
        values = self._bound_run(names, full) if self.binding and not self.plans else None
        if values is None:
            values = dict(zip(names, run_batch(self.session, names, full, batch), strict=True))
        grams = {
            node: Grams(
                plan, {part: [values.pop(n) for n in out] for part, out in plan.outputs.items()}, masks[node]
            )
            for node, plan in self.plans.items()
        }
        return values, grams

    @property
    def reuses_outputs(self) -> bool:
        """Whether the next `run` may overwrite the arrays the last one returned."""
        return bool(self.binding and not self.plans)

    def _bound_run(self, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The layer inputs written by onnxruntime into arrays kept from batch to batch (None where
        this cannot serve: unknown shapes, other types or inputs; then `run_batch` runs). Fresh arrays
        for every batch's ~1 GB of ResNet-50 activations would page-fault in at every run."""
        signature, shapes = self._shapes_for(feed)
        inputs = {i.name: i.type for i in self.session.get_inputs()}
        typed = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}
        if set(feed) != set(inputs) or any(
            np.asarray(value).dtype != typed.get(inputs[name]) for name, value in feed.items()
        ):
            return None
        known = {n: shapes.get(n, ((), 0)) for n in names}
        if any(kind != TensorProto.FLOAT or not dims or None in dims for dims, kind in known.values()):
            return None
        if signature not in self._outputs:
            self._outputs = {signature: {n: np.empty(dims, np.float32) for n, (dims, _) in known.items()}}
        outputs = self._outputs[signature]
        binding = self.session.io_binding()
        arrays = {name: np.ascontiguousarray(value) for name, value in feed.items()}
        for name, array in arrays.items():
            binding.bind_cpu_input(name, array)
        for name, array in outputs.items():
            binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        try:
            self.session.run_with_iobinding(binding)
        except Exception:  # shapes onnx inferred differ from onnxruntime's: copies from now on
            self.binding = False
            return None
        return dict(outputs)


#: Layer inputs written into arrays reused from batch to batch where their shapes are known (one
#: batch of activations held instead of two, but no overlap of the sums with the next run). Off: on
#: ResNet-50 it measured no faster (models/RESULTS_calib_speed.md, path `numpy-reused`).
REUSE_OUTPUTS = False


def _held(moments: LayerMoments, count: int, every: int) -> np.ndarray:
    """Which of the next ``count`` samples are held apart (every ``every``-th), counted on."""
    index = moments.samples_seen + np.arange(count)
    moments.samples_seen += count
    return (index % every == every - 1) if every else np.zeros(count, dtype=bool)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
