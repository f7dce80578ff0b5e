"""Latency as a budget cost: every factorizable layer timed dense and as its pair, on the target EP.

MACs are the wrong cost where narrow GEMMs, layout transposes and per-kernel launches dominate (GPUs;
small layers on the CPU). So each layer is cut out as a small ONNX model (its node(s) with the layer's
real input shape at the timing batch, random weights of the real shapes) and timed dense and factorized
at a grid of `GRID_POINTS` candidate ranks, interleaved (`bench.time_models`: medians of rounds that run
every variant once); ranks between grid points are interpolated. Each layer's timings are net of the
per-run overhead (an Identity model on the same inputs, timed with them). The dense model's end-to-end
time is the cost's total; the sum of the layers is calibrated against it and against compressed models
timed end to end near the plan (`lrdeploy.runtime.latencyfit`), so that a target fraction is a measured one.

The table is cached on disk (`lrdeploy.runtime.latencytable`: one file per environment, one entry per
layer signature — op, attributes, input and weight shapes, grid), so a second compress on the same
machine profiles nothing; ``latency_table`` names a file measured elsewhere. After compression
`lrdeploy.runtime.latencyguard` times the output against the input and reverts layers until it is not
slower.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.errors import UsageError
from lrdeploy.passes.factorize import factorize
from lrdeploy.passes.names import NameRegistry
from lrdeploy.planning import costs
from lrdeploy.planning.allocate import LayerShape
from lrdeploy.planning.budget import candidate_ranks
from lrdeploy.planning.costmodels import CostContext, Costing, unknown_dims
from lrdeploy.planning.sensitivity import grid
from lrdeploy.runtime.bench import BenchConfig, Timing, time_models
from lrdeploy.runtime.inputs import model_inputs, resolve_shapes
from lrdeploy.runtime.latencyfit import Probe, export, fit, next_probe, probe_model, random_rewrite
from lrdeploy.runtime.latencytable import (
    LatencyTable,
    LayerTiming,
    digest,
    environment,
    table_for,
    write_atomically,
)
from lrdeploy.runtime.sessions import Device, select_device

if TYPE_CHECKING:
    from lrdeploy.config import CompressConfig
    from lrdeploy.planning.plan import Analysis

__all__ = ["GRID_POINTS", "LatencyCost", "LatencyShape", "latency_costing", "timing_shapes"]

#: Ranks timed per layer; the others are interpolated (profiling time: layers × (GRID_POINTS + 2) models).
GRID_POINTS = 6
#: Rounds per layer table entry and per dense end-to-end timing (after warm-up rounds).
LAYER_RUNS, LAYER_WARMUP = 15, 3
MODEL_RUNS, MODEL_WARMUP = 20, 4
#: Compressed models timed end to end to calibrate the table (`latencyfit`), and how close to a latency
#: target (as a fraction of dense) a probe's measurement ends the search.
PROBES, CLOSE = 3, 0.03
#: A layer's time net of the per-run overhead is at least this (ms): timings stay positive.
FLOOR_MS = 1e-4


@dataclass(frozen=True)
class LatencyShape(LayerShape):
    """A layer's shape plus its name: the latency of a rank is looked up, not computed from m and n."""

    layer: str = ""


@dataclass(frozen=True)
class LatencyCost:
    """`allocate.CostModel` over a latency table: milliseconds per layer and rank, times the model's
    calibration ``scale`` (`latencyfit`: isolated layers, rescaled to what the whole model measures)."""

    timings: Mapping[str, LayerTiming]
    scale: float = 1.0

    def cost(self, shape: LayerShape, rank: int | None) -> float:
        return self.scale * self.timings[shape.layer].at(rank)  # type: ignore[attr-defined]


def _layer_graph(
    nodes: Sequence[gs.Node], shapes: Mapping[str, tuple[int | None, ...]], seed: int
) -> tuple[gs.Graph, dict[str, tuple[int, ...]]]:
    """The group's nodes alone: variable inputs at their inferred shapes, constants random at theirs."""
    rng = np.random.default_rng(seed)
    made: dict[int, gs.Tensor] = {}
    inputs: dict[str, tuple[int, ...]] = {}
    copies, outputs = [], []
    for index, node in enumerate(nodes):
        ins = []
        for tensor in node.inputs:
            if id(tensor) in made:
                ins.append(made[id(tensor)])
                continue
            if isinstance(tensor, gs.Constant):
                # shape and dtype only: reading .values would load (and mark) the input's lazy weight
                data = (rng.standard_normal(tuple(tensor.shape)) * 0.05).astype(np.dtype(tensor.dtype))
                made[id(tensor)] = gs.Constant(f"w{len(made)}", data)
            elif tensor.name == "":
                made[id(tensor)] = gs.Variable.empty()
            else:
                shape = shapes.get(tensor.name)
                if shape is None or any(d is None for d in shape):
                    raise unknown_dims(f"the latency of layer '{node.name}': its input shape")
                name = f"x{len(inputs)}"
                inputs[name] = tuple(int(d) for d in shape)  # type: ignore[arg-type]
                made[id(tensor)] = gs.Variable(name, dtype=tensor.dtype or np.float32, shape=inputs[name])
            ins.append(made[id(tensor)])
        out = gs.Variable(f"y{index}", dtype=node.outputs[0].dtype or np.float32)
        outputs.append(out)
        copies.append(gs.Node(node.op, f"n{index}", dict(node.attrs), ins, [out]))
    feeds = [made[i] for i in dict.fromkeys(id(t) for n in nodes for t in n.inputs) if made[i].name in inputs]
    return gs.Graph(copies, feeds, outputs), inputs


def _null_graph(graph: gs.Graph) -> gs.Graph:
    """The same inputs copied to outputs: what running any model costs (feeding, fetching, dispatch),
    subtracted from the layer's timings so that they add up like the layers of one model."""
    copies = [gs.Variable(f"copy{i}", dtype=x.dtype) for i, x in enumerate(graph.inputs)]
    nodes = [
        gs.Node("Identity", f"id{i}", {}, [x], [y])
        for i, (x, y) in enumerate(zip(graph.inputs, copies, strict=True))
    ]
    return gs.Graph(nodes, list(graph.inputs), copies)


def _variants(
    nodes: Sequence[gs.Node],
    ranks: Sequence[int],
    shapes: Mapping[str, tuple[int | None, ...]],
    folded: onnx.ModelProto,
    convert: Callable[[onnx.ModelProto], onnx.ModelProto] | None,
) -> tuple[dict[str, onnx.ModelProto], dict[str, tuple[int, ...]]]:
    """{"dense": model, "r8": pair at rank 8, ...}, and the input shapes."""
    opsets, ir = list(folded.opset_import), folded.ir_version
    graph, inputs = _layer_graph(nodes, shapes, seed=0)
    models = {"dense": export(graph, opsets, ir), "null": export(_null_graph(graph), opsets, ir)}
    for rank in ranks:
        graph, _ = _layer_graph(nodes, shapes, seed=rank)
        factorize(graph, [random_rewrite(graph.nodes, rank, rank)], NameRegistry(graph))
        models[f"r{rank}"] = export(graph, opsets, ir)
    if convert is not None:
        models = {name: convert(model) for name, model in models.items()}
    return models, inputs


def _signature(nodes: Sequence[gs.Node], shapes: Mapping[str, object], ranks: Sequence[int]) -> str:
    parts = []
    for node in nodes:
        attrs = {k: repr(v) for k, v in sorted(node.attrs.items())}
        tensors = [
            (str(np.dtype(t.dtype)), list(t.shape)) if isinstance(t, gs.Constant) else shapes.get(t.name)
            for t in node.inputs
        ]
        parts.append([node.op, attrs, json.dumps(tensors, default=str)])
    return digest([parts, list(ranks)])


@dataclass
class _Profiler:
    """Times what the table lacks; counts what it timed (the cache's tests count on it)."""

    device: Device
    bench: BenchConfig
    timed: int = 0
    seconds: float = 0.0

    def time(
        self, models: Mapping[str, onnx.ModelProto], shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, float]:
        start = time.perf_counter()
        timings: dict[str, Timing] = _measure(models, self.device, self.bench, shapes)
        self.timed += 1
        self.seconds += time.perf_counter() - start
        return {name: t.p50 for name, t in timings.items()}


def _measure(
    models: Mapping[str, onnx.ModelProto | tuple[onnx.ModelProto, bytes | Path]],
    device: Device,
    bench: BenchConfig,
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, Timing]:
    """One interleaved timing (the seam tests replace to inject measurements)."""
    return time_models(models, device, bench, shapes)


def _settings(config: CompressConfig) -> tuple[Device, BenchConfig, str]:
    bench = BenchConfig(
        device=config.verification.device,
        batch_sizes=(config.latency_batch,),
        warmup=LAYER_WARMUP,
        runs=LAYER_RUNS,
        threads=config.threads,
        input_shapes=dict(config.input_shapes),
    )
    device = select_device(bench.device, tf32=bench.tf32, cuda_options=bench.cuda_options())
    return device, bench, "float16" if config.precision == "fp16" else "float32"


def timing_shapes(model: onnx.ModelProto, config: CompressConfig) -> dict[str, tuple[int, ...]]:
    """The input shapes latency is timed at: the resolved shapes with ``latency_batch`` as the batch dim,
    except where the model fixes its batch dim (then that is the batch it runs)."""
    shapes = resolve_shapes(model, config.input_shapes, strict=True)
    timed = {}
    for spec in model_inputs(model):
        shape = shapes[spec.name] or ()
        fixed = isinstance(spec.dims[0], int) if spec.dims else True
        timed[spec.name] = tuple(shape) if fixed or not shape else (config.latency_batch, *shape[1:])
    return timed


def latency_costing(analyses: Sequence[Analysis], context: CostContext) -> Costing:
    """The "latency" cost: measured milliseconds per layer and rank on the verification's device."""
    config, folded = context.config, context.folded
    assert folded is not None, "the latency cost times the BN-folded model"
    device, bench, dtype = _settings(config)
    convert = _converter(config.precision)
    where = environment(device, bench, dtype)
    table, path, local = table_for(config, where)
    profiler = _Profiler(device, bench)
    shapes_in = timing_shapes(folded, config)
    tensor_shapes = costs.infer_shapes(folded, shapes_in)
    timings: dict[str, LayerTiming] = {}
    shapes: dict[str, LayerShape] = {}
    reasons: dict[str, str] = {}
    for done, analysis in enumerate(analyses, 1):
        view, nodes = analysis.group.view, analysis.group.nodes
        factorizable = not analysis.skip and analysis.spectrum is not None
        ranks = (
            grid(candidate_ranks(view.m, view.n, config.rank_multiple), GRID_POINTS) if factorizable else []
        )
        key = _signature(nodes, tensor_shapes, ranks)
        timing = table.layers.get(key)
        if timing is None:
            if not local:
                raise UsageError(
                    f"latency table {path} has no entry for layer '{analysis.name}' at these shapes and "
                    "ranks; measure it on the target with this model and options"
                )
            models, inputs = _variants(nodes, ranks, tensor_shapes, folded, convert)
            measured = profiler.time(models, inputs)
            null = measured["null"]
            net = {name: max(ms - null, FLOOR_MS) for name, ms in measured.items()}
            timing = LayerTiming(net["dense"], tuple(ranks), tuple(net[f"r{r}"] for r in ranks))
            table.layers[key], table.changed = timing, True
        timings[analysis.name] = timing
        shapes[analysis.name] = LatencyShape(view.m, view.n, 1, analysis.name)
        if factorizable and ranks and min(timing.pairs) >= timing.dense:
            best = int(np.argmin(timing.pairs))
            reasons[analysis.name] = (
                f"slower on {device.provider} (dense {timing.dense:.3g} ms, best pair "
                f"{timing.pairs[best]:.3g} ms at rank {timing.ranks[best]})"
            )
        if context.progress:
            context.progress("latency", done, len(analyses))
    if table.changed and local:
        write_atomically(path, table.to_json())
    model_key = digest([_model_digest(folded), where])
    dense_ms = table.models.get(model_key)
    if dense_ms is None:
        if not local:
            raise UsageError(f"latency table {path} has not timed this model; measure it on the target")
        dense_ms = _model_ms(profiler, {"model": folded}, shapes_in, convert)["model"]
        table.models[model_key] = dense_ms
        write_atomically(path, table.to_json())
    layers = math.fsum(t.dense for t in timings.values())
    calibration = fit(dense_ms, layers)
    costing = Costing(LatencyCost(timings), shapes, calibration.total, "ms", calibration.fixed, [], reasons)
    target = config.budget[1] if config.budget is not None and config.budget[0] == "latency" else None
    saved = (table, path, local, model_key)
    measured: list[Probe] = []
    seen: list[dict[str, int]] = []
    for _ in range(PROBES):  # each probe: the plan of the table as calibrated so far (`latencyfit`)
        ranks = next_probe(analyses, costing, config, timings)
        if not ranks or ranks in seen:  # nothing new to time
            break
        timed = _probe_ms(ranks, analyses, folded, saved, profiler, shapes_in, convert)
        if timed is None:  # a table from elsewhere without this probe: the table as measured
            break
        seen.append(ranks)
        layers_probe = math.fsum(t.at(ranks.get(name)) for name, t in timings.items())
        measured.append(Probe(layers_probe, timed[1] / timed[0]))
        calibration = fit(dense_ms, layers, measured, target)
        costing.model, costing.fixed = LatencyCost(timings, calibration.scale), calibration.fixed
        costing.total = calibration.total
        if target is not None and abs(measured[-1].ratio - target) <= CLOSE:
            break
    costing.notes = [
        f"latency table: {profiler.timed} layer/model timing(s) on {device.provider} "
        f"({profiler.seconds:.1f} s), the rest from {path}"
        if profiler.timed
        else f"latency table: all from {path} (nothing profiled)",
        f"latency calibrated end to end: {calibration.note}",
    ]
    costing.details = {
        "provider": device.provider,
        "batch": next(iter(shapes_in.values()), (1,))[0],
        "table": str(path),
        "local": local,
        "profiled": profiler.timed,
        "profiling_s": round(profiler.seconds, 2),
        "calibration": calibration.to_dict(),
    }
    return costing


def _probe_ms(
    ranks: Mapping[str, int],
    analyses: Sequence[Analysis],
    folded: onnx.ModelProto,
    saved: tuple[LatencyTable, Path, bool, str],
    profiler: _Profiler,
    shapes: Mapping[str, tuple[int, ...]],
    convert: Callable[[onnx.ModelProto], onnx.ModelProto] | None,
) -> tuple[float, float] | None:
    """(dense, probe) ms of one interleaved timing, from the table when it has them; None when a
    table from elsewhere lacks them."""
    table, path, local, model_key = saved
    key = digest([model_key, "probe", sorted(ranks.items())])
    keys = (f"{key}:dense", key)
    if all(k in table.models for k in keys):
        return table.models[keys[0]], table.models[keys[1]]
    if not local:
        return None
    groups = {a.name: tuple(node.name for node in a.group.nodes) for a in analyses}
    probe = probe_model(folded, {groups[name]: rank for name, rank in ranks.items()})
    measured = _model_ms(profiler, {"model": folded, "probe": probe}, shapes, convert)
    for k, name in zip(keys, ("model", "probe"), strict=True):
        table.models[k] = measured[name]
    write_atomically(path, table.to_json())
    return measured["model"], measured["probe"]


def _model_digest(model: onnx.ModelProto) -> str:
    digest = hashlib.sha256()
    digest.update(model.graph.SerializeToString())
    return digest.hexdigest()[:24]


def _model_ms(
    profiler: _Profiler,
    models: Mapping[str, onnx.ModelProto],
    shapes: Mapping[str, tuple[int, ...]],
    convert: Callable[[onnx.ModelProto], onnx.ModelProto] | None,
) -> dict[str, float]:
    """Whole models (at the deployed precision), interleaved, with the rounds of an end-to-end timing."""
    if convert is not None:
        models = {name: convert(model) for name, model in models.items()}
    bench = BenchConfig(
        profiler.bench.device,
        profiler.bench.batch_sizes,
        MODEL_WARMUP,
        MODEL_RUNS,
        profiler.bench.threads,
        profiler.bench.input_shapes,
    )
    saved, profiler.bench = profiler.bench, bench
    try:
        return profiler.time(models, shapes)
    finally:
        profiler.bench = saved


def _converter(precision: str) -> Callable[[onnx.ModelProto], onnx.ModelProto] | None:
    if precision != "fp16":
        return None
    from lrdeploy.runtime.precision import to_fp16

    return to_fp16
