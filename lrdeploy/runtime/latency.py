"""Latency as a budget cost: every factorizable layer timed dense and as its pair, on the target EP.

MACs are the wrong cost where narrow GEMMs, layout transposes and per-kernel launches dominate (GPUs;
small layers on the CPU). So each layer is cut out as a small ONNX model (its node(s) with the layer's
real input shape at the timing batch, random weights of the real shapes) and timed dense and factorized
at a grid of `GRID_POINTS` candidate ranks, interleaved (`bench.time_models`: medians of rounds that run
every variant once); ranks between grid points are interpolated. The dense model is timed end to end:
that (or the sum of the layers, when larger) is the cost's total; what the dense layers leave of it is fixed.
Each layer's timings are net of the per-run overhead (an Identity model on the same inputs, timed with them).

The table is cached on disk (``$LRDEPLOY_CACHE`` or ``~/.cache/lrdeploy/latency/``), one file per
environment (EP, onnxruntime version, CPU/GPU name, threads, batch, dtype, EP settings) with one entry per
layer signature (op, attributes, input and weight shapes, grid), so a second compress on the same machine
profiles nothing. ``latency_table`` names a file to read (measured on the target, used on a build box) or
to write. After compression `never_slower` times the output against the input on the same EP and
reverts the layers with the least predicted gain until the output is not slower (`NOT_SLOWER`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.errors import UsageError
from lrdeploy.io.modelio import save_model
from lrdeploy.passes.factorize import Rewrite, factorize
from lrdeploy.passes.lowrank_ops import ADAPTERS, weight_view
from lrdeploy.passes.names import NameRegistry
from lrdeploy.planning import costs
from lrdeploy.planning.allocate import LayerShape
from lrdeploy.planning.budget import candidate_ranks
from lrdeploy.planning.costmodels import CostContext, Costing, unknown_dims
from lrdeploy.planning.sensitivity import grid
from lrdeploy.runtime.bench import BenchConfig, Timing, time_models
from lrdeploy.runtime.inputs import model_inputs, resolve_shapes
from lrdeploy.runtime.sessions import Device, select_device
from lrdeploy.spelling import option

if TYPE_CHECKING:
    from lrdeploy.config import CompressConfig
    from lrdeploy.planning.plan import Analysis, LayerDecision

__all__ = [
    "NOT_SLOWER",
    "SCHEMA",
    "LatencyCheck",
    "LatencyCost",
    "LatencyShape",
    "LatencyTable",
    "gains_of",
    "latency_costing",
    "never_slower",
    "predicted_ms",
]

SCHEMA = 1
#: Ranks timed per layer; the others are interpolated (profiling time: layers × (GRID_POINTS + 1) models).
GRID_POINTS = 6
#: Rounds per layer table entry and per end-to-end comparison (after warm-up rounds).
LAYER_RUNS, LAYER_WARMUP = 15, 3
MODEL_RUNS, MODEL_WARMUP = 20, 4
#: A layer's time net of the per-run overhead is at least this (ms): timings stay positive.
FLOOR_MS = 1e-4
#: "Not slower": the output's p50 speedup over the input is at least this (2% is the run-to-run noise
#: of interleaved medians on the shared 2-core container).
NOT_SLOWER = 0.98
#: Rounds of reverting layers before every layer is dense.
MAX_ROUNDS = 6


@dataclass(frozen=True)
class LatencyShape(LayerShape):
    """A layer's shape plus its name: the latency of a rank is looked up, not computed from m and n."""

    layer: str = ""


@dataclass(frozen=True)
class LayerTiming:
    """A layer's dense median and its pair's medians at the measured ranks (ms)."""

    dense: float
    ranks: tuple[int, ...]
    pairs: tuple[float, ...]

    def at(self, rank: int | None) -> float:
        if rank is None or not self.ranks:
            return self.dense
        return float(np.interp(rank, self.ranks, self.pairs))

    def to_dict(self) -> dict[str, object]:
        return {
            "dense_ms": self.dense,
            "pairs_ms": {str(r): t for r, t in zip(self.ranks, self.pairs, strict=True)},
        }


@dataclass(frozen=True)
class LatencyCost:
    """`allocate.CostModel` over a latency table: milliseconds per layer and rank."""

    timings: Mapping[str, LayerTiming]

    def cost(self, shape: LayerShape, rank: int | None) -> float:
        return self.timings[shape.layer].at(rank)  # type: ignore[attr-defined]


def _cache_dir() -> Path:
    root = os.environ.get("LRDEPLOY_CACHE")
    return Path(root) / "latency" if root else Path.home() / ".cache" / "lrdeploy" / "latency"


def _device_name(device: Device) -> str:
    if device.name != "cpu":
        from lrdeploy.runtime.envinfo import _gpus

        return ", ".join(_gpus()) or "unknown GPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(device: Device, bench: BenchConfig, dtype: str) -> dict[str, object]:
    import onnxruntime

    settings = dict(device.providers[0][1])
    return {
        "ep": device.provider,
        "onnxruntime": onnxruntime.__version__,
        "device": _device_name(device),
        "threads": bench.threads,
        "batch": bench.batch_sizes[0],
        "dtype": dtype,
        "settings": {k: str(v) for k, v in sorted(settings.items())},
    }


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class LatencyTable:
    """Measured layers (by signature) and dense models (by digest) in one environment."""

    environment: dict[str, object]
    layers: dict[str, LayerTiming] = field(default_factory=dict)
    models: dict[str, float] = field(default_factory=dict)
    changed: bool = False

    def to_json(self) -> str:
        layers = {key: timing.to_dict() for key, timing in sorted(self.layers.items())}
        document = {
            "schema": SCHEMA,
            "environment": self.environment,
            "layers": layers,
            "models": self.models,
        }
        return json.dumps(document, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> LatencyTable:
        """A table file, validated; anything wrong is one UsageError line naming the file."""
        hint = f"measure it again with {option('latency_table')} pointing at a new file"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"latency table {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"latency table {path} is not valid JSON ({str(error)[:80]}); {hint}") from None
        try:
            return cls._parse(data)
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise UsageError(f"latency table {path} is malformed ({str(error)[:100]}); {hint}") from None

    @classmethod
    def _parse(cls, data: object) -> LatencyTable:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"schema {found!r}, expected {SCHEMA}")
        environment, layers, models = data["environment"], data["layers"], data["models"]
        if not isinstance(environment, dict) or not isinstance(layers, dict) or not isinstance(models, dict):
            raise TypeError("environment, layers and models must be objects")
        table = cls(dict(environment))
        for key, entry in layers.items():
            pairs = sorted((int(r), _milliseconds(t)) for r, t in entry["pairs_ms"].items())
            if any(r < 1 for r, _ in pairs):
                raise ValueError(f"layer {key[:12]}: ranks must be ≥ 1")
            ranks = tuple(r for r, _ in pairs)
            table.layers[str(key)] = LayerTiming(
                _milliseconds(entry["dense_ms"]), ranks, tuple(t for _, t in pairs)
            )
        table.models = {str(k): _milliseconds(v) for k, v in models.items()}
        return table


def _milliseconds(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"a latency must be a positive number of ms, got {value!r}")
    return float(value)


def _write(path: Path, text: str) -> None:
    """Atomically: a partial table is never read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


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


def _export(graph: gs.Graph, opsets: Sequence[onnx.OperatorSetIdProto], ir_version: int) -> onnx.ModelProto:
    model = gs.export_onnx(graph.cleanup(), do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    model.ir_version = ir_version
    return model


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
    models = {"dense": _export(graph, opsets, ir), "null": _export(_null_graph(graph), opsets, ir)}
    for rank in ranks:
        graph, _ = _layer_graph(nodes, shapes, seed=rank)
        view = weight_view(graph.nodes[0])
        assert view is not None and not isinstance(view, str)
        rng = np.random.default_rng(rank)
        a = rng.standard_normal((view.m, rank)).astype(np.float32) * 0.05
        b = rng.standard_normal((rank, view.n)).astype(np.float32) * 0.05
        first, second = ADAPTERS[view.layout[0]].stored_factors(view, a, b)
        factorize(graph, [Rewrite(tuple(graph.nodes), view, rank, first, second)], NameRegistry(graph))
        models[f"r{rank}"] = _export(graph, opsets, ir)
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
    return _digest([parts, list(ranks)])


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


def _table_for(config: CompressConfig, environment: dict[str, object]) -> tuple[LatencyTable, Path, bool]:
    """(table, where it is saved, whether it was measured here): the named file or this machine's cache."""
    if config.latency_table is not None:
        path = Path(config.latency_table)
        if path.exists():
            table = LatencyTable.read(path)
            return table, path, table.environment == environment
        return LatencyTable(environment), path, True
    path = _cache_dir() / f"{_digest(environment)}.json"
    if path.exists():
        try:
            table = LatencyTable.read(path)
        except UsageError:  # a damaged cache is measured again, not an error
            table = LatencyTable(environment)
        if table.environment == environment:
            return table, path, True
    return LatencyTable(environment), path, True


def latency_costing(analyses: Sequence[Analysis], context: CostContext) -> Costing:
    """The "latency" cost: measured milliseconds per layer and rank on the verification's device."""
    config, folded = context.config, context.folded
    assert folded is not None, "the latency cost times the BN-folded model"
    device, bench, dtype = _settings(config)
    convert = _converter(config.precision)
    environment = _environment(device, bench, dtype)
    table, path, local = _table_for(config, environment)
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
    model_key = _digest([_model_digest(folded), environment])
    total = table.models.get(model_key)
    if total is None:
        if not local:
            raise UsageError(f"latency table {path} has not timed this model; measure it on the target")
        dense = folded if convert is None else convert(folded)
        total = _model_ms(profiler, dense, shapes_in)
        table.models[model_key], table.changed = total, True
    if table.changed and local:
        _write(path, table.to_json())
    dense_sum = math.fsum(t.dense for t in timings.values())
    # the dense model as the table predicts it: its layers, plus what the end-to-end run has beyond them
    total = max(total, dense_sum)
    notes = [
        f"latency table: {profiler.timed} layer/model timing(s) on {device.provider} "
        f"({profiler.seconds:.1f} s), the rest from {path}"
        if profiler.timed
        else f"latency table: all from {path} (nothing profiled)"
    ]
    costing = Costing(LatencyCost(timings), shapes, total, "ms", max(total - dense_sum, 0.0), notes, reasons)
    costing.details = {
        "provider": device.provider,
        "batch": next(iter(shapes_in.values()), (1,))[0],
        "table": str(path),
        "local": local,
        "profiled": profiler.timed,
        "profiling_s": round(profiler.seconds, 2),
    }
    return costing


def _model_digest(model: onnx.ModelProto) -> str:
    digest = hashlib.sha256()
    digest.update(model.graph.SerializeToString())
    return digest.hexdigest()[:24]


def _model_ms(profiler: _Profiler, model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> float:
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
        return profiler.time({"model": model}, shapes)["model"]
    finally:
        profiler.bench = saved


def _converter(precision: str) -> Callable[[onnx.ModelProto], onnx.ModelProto] | None:
    if precision != "fp16":
        return None
    from lrdeploy.runtime.precision import to_fp16

    return to_fp16


@dataclass
class LatencyCheck:
    """The end-to-end comparison on the target: medians of interleaved runs, input vs output."""

    provider: str
    batch: int
    predicted_ms: float
    input_ms: float
    output_ms: float
    reverted: list[str]
    rounds: int
    seconds: float

    @property
    def speedup(self) -> float:
        return self.input_ms / self.output_ms

    def to_dict(self) -> dict[str, object]:
        return {
            "provider": self.provider,
            "batch": self.batch,
            "predicted_ms": self.predicted_ms,
            "measured_input_ms": self.input_ms,
            "measured_output_ms": self.output_ms,
            "speedup": self.speedup,
            "not_slower_rule": f"p50 speedup ≥ {NOT_SLOWER}",
            "reverted": self.reverted,
            "rounds": self.rounds,
            "seconds": round(self.seconds, 2),
        }


def never_slower(
    original: tuple[onnx.ModelProto, bytes | Path],
    compressed: onnx.ModelProto,
    rebuild: Callable[[set[str]], onnx.ModelProto],
    gains: Mapping[str, float],
    predicted_ms: float,
    config: CompressConfig,
) -> tuple[onnx.ModelProto, LatencyCheck]:
    """Time ``compressed`` against ``original`` (its proto and what onnxruntime loads).

    While it is slower (speedup < `NOT_SLOWER`), revert the factorized layers with the least predicted
    gain (``gains``: layer → dense − pair ms), a quarter of them per round, by ``rebuild(excluded)``;
    after `MAX_ROUNDS` every layer is dense."""
    start = time.perf_counter()
    device, bench, _ = _settings(config)
    bench = BenchConfig(
        bench.device, bench.batch_sizes, MODEL_WARMUP, MODEL_RUNS, bench.threads, bench.input_shapes
    )
    shapes = timing_shapes(original[0], config)
    order = sorted(gains, key=lambda name: gains[name])
    step = max(1, math.ceil(len(order) / 4))
    reverted: list[str] = []
    rounds = 0
    while True:
        rounds += 1
        input_ms, output_ms = _compare(original, compressed, device, bench, shapes)
        if input_ms / output_ms >= NOT_SLOWER or len(reverted) == len(order):
            break
        more = order[len(reverted) : len(reverted) + step] if rounds < MAX_ROUNDS else order[len(reverted) :]
        reverted.extend(more)
        compressed = rebuild(set(reverted))
    check = LatencyCheck(
        device.provider,
        next(iter(shapes.values()), (1,))[0],
        predicted_ms,
        input_ms,
        output_ms,
        reverted,
        rounds,
        time.perf_counter() - start,
    )
    return compressed, check


def _compare(
    original: tuple[onnx.ModelProto, bytes | Path],
    compressed: onnx.ModelProto,
    device: Device,
    bench: BenchConfig,
    shapes: Mapping[str, tuple[int, ...]],
) -> tuple[float, float]:
    """p50 of the input and of the output, interleaved. A "slower" verdict is measured once more and
    the rounds pooled, so that one busy moment of the machine does not revert layers."""
    pooled: dict[str, list[float]] = {"input": [], "output": []}
    with tempfile.TemporaryDirectory(prefix="lrdeploy-latency-") as folder:
        path = Path(folder) / "output.onnx"
        save_model(compressed, path)  # reads the weights still in the input's file (in place)
        for _ in range(2):
            measured = _measure({"input": original, "output": (compressed, path)}, device, bench, shapes)
            for name, samples in pooled.items():
                samples.extend(measured[name].latencies_ms)
            input_ms, output_ms = (float(np.median(pooled[name])) for name in ("input", "output"))
            if input_ms / output_ms >= NOT_SLOWER:
                break
    return input_ms, output_ms


def predicted_ms(costing: Costing, ranks: Mapping[str, int | None]) -> float:
    """The table's prediction for the whole model at ``ranks`` (layers not named are dense)."""
    model = costing.model
    assert isinstance(model, LatencyCost)
    layers = math.fsum(timing.at(ranks.get(name)) for name, timing in model.timings.items())
    return (costing.fixed or 0.0) + layers


def gains_of(costing: Costing, ranks: Mapping[str, int | None]) -> dict[str, float]:
    """Predicted ms saved per factorized layer at its rank (dense − pair)."""
    model = costing.model
    assert isinstance(model, LatencyCost)
    return {name: model.timings[name].dense - model.timings[name].at(r) for name, r in ranks.items() if r}


def guard(
    original: tuple[onnx.ModelProto, Path | None],
    compressed: onnx.ModelProto,
    rewrites: Sequence[Rewrite],
    decisions: list[LayerDecision],
    pairs: dict[str, list[str]],
    costing: Costing,
    config: CompressConfig,
    ir_version: int,
    metadata: Mapping[str, str],
) -> tuple[onnx.ModelProto, list[LayerDecision], dict[str, list[str]], dict[str, object]]:
    """`never_slower` for `lrdeploy.compress`: the model, decisions and pairs after any reverting, and
    the report's latency entry. ``original`` is the input (our named copy) and its file, if any."""
    from lrdeploy.io.graphio import from_graph
    from lrdeploy.pipeline import prepare_graph
    from lrdeploy.runtime.verification import runtime_source

    table = costing if costing.unit == "ms" else costing.constraint
    assert table is not None
    ranks = {d.name: d.rank for d in decisions if d.status == "factorized" and d.shared_primary is None}
    about = {"dense_predicted_ms": table.total, "predicted_ms": predicted_ms(table, ranks)} | table.details
    if not table.details["local"]:  # timing here says nothing about the machine the table came from
        return (
            compressed,
            decisions,
            pairs,
            about | {"check": "skipped: the latency table is another machine's"},
        )
    model, source = original

    def rebuild(excluded: set[str]) -> onnx.ModelProto:  # the rewrite again, ``excluded`` left dense
        graph, names, _, _ = prepare_graph(model, config.fold_bn)
        nodes = {node.name: node for node in graph.nodes}
        kept = [
            dataclasses.replace(r, nodes=tuple(nodes[n.name] for n in r.nodes))
            for r in rewrites
            if r.nodes[0].name not in excluded
        ]
        factorize(graph, kept, names)
        return from_graph(graph, model, ir_version, metadata=metadata)

    with runtime_source(model, source) as reference:
        compressed, check = never_slower(
            (model, reference), compressed, rebuild, gains_of(table, ranks), about["predicted_ms"], config
        )
    reverted = set(check.reverted)
    why = f"reverted to dense: the output measured slower than the input on {check.provider}"
    back = {
        d.name for d in decisions if d.status == "factorized" and (d.shared_primary or d.name) in reverted
    }
    decisions = [
        dataclasses.replace(
            d, status="skipped", reason=why, rank=None, energy_kept=None, method=None, calib=None
        )
        if d.name in back
        else d
        for d in decisions
    ]
    pairs = {name: pair for name, pair in pairs.items() if name not in back}
    return compressed, decisions, pairs, check.to_dict() | about
