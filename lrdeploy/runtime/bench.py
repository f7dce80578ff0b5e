"""Latency benchmarks on onnxruntime execution providers, several models interleaved.

Machines are noisy, so models are timed side by side: after warm-up, each round runs every model once
(A B A B …) and the statistics are medians and percentiles over rounds. On the CPU, several models are
timed with onnxruntime's thread spinning off (an idle session's spinning workers would slow the others).
On CUDA/TensorRT the inputs and outputs stay on the GPU (IO binding), so host↔device copies are not
timed. "Efficiency" is the measured speedup over the first model divided by its MAC reduction (MACs from
`planning.costs`, the same counter as the compression report): 1.0 means every saved multiply-accumulate
turned into time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from lrdeploy.errors import RuntimeFailure, UsageError
from lrdeploy.io.modelio import load_model
from lrdeploy.passes.names import name_nodes
from lrdeploy.passes.scopes import scoped_total
from lrdeploy.planning import costs
from lrdeploy.runtime.inputs import model_inputs, random_feeds, resolve_shapes
from lrdeploy.runtime.sessions import Device, make_session, select_device, summarize
from lrdeploy.spelling import either, option
from lrdeploy.units import format_count

__all__ = ["BenchConfig", "BenchResult", "Timing", "benchmark", "time_models"]


@dataclass(frozen=True)
class BenchConfig:
    device: str = "auto"
    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 10
    runs: int = 50
    threads: int | None = None
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    tf32: bool = True  # onnxruntime's own default on CUDA: time what a deployment runs
    cuda_graph: bool = False
    # CUDA EP settings that decide how narrow convolutions run (unmeasured here: onnxruntime's defaults)
    prefer_nhwc: bool = False
    cudnn_conv_algo_search: str = "EXHAUSTIVE"  # or HEURISTIC; DEFAULT picks no algorithm, never offered
    cudnn_conv_use_max_workspace: bool = True

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UsageError(
                f"{option('batch_sizes')} needs positive batch sizes, e.g. "
                + either("--batch 1,8,32", "batch_sizes=(1, 8, 32)")
            )
        if self.runs < 1 or self.warmup < 0:
            raise UsageError(f"{option('runs')} must be ≥ 1 and {option('warmup')} ≥ 0")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"{option('threads')} must be ≥ 1")
        if self.cudnn_conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC"):
            raise UsageError(
                f"{option('cudnn_conv_algo_search')} must be EXHAUSTIVE or HEURISTIC, "
                f"got {self.cudnn_conv_algo_search!r}"
            )

    def cuda_options(self) -> dict[str, str]:
        """The CUDA EP options beyond TF32 and CUDA graphs (`sessions.select_device`)."""
        return {
            "prefer_nhwc": str(int(self.prefer_nhwc)),
            "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
            "cudnn_conv_use_max_workspace": str(int(self.cudnn_conv_use_max_workspace)),
        }


@dataclass(frozen=True)
class Timing:
    model: str
    batch: int
    latencies_ms: tuple[float, ...]
    macs: int | None

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def mean(self) -> float:
        return float(np.mean(self.latencies_ms))

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch * 1000.0 / self.p50

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "batch": self.batch,
            "p50_ms": self.p50,
            "p90_ms": self.percentile(90),
            "p99_ms": self.percentile(99),
            "mean_ms": self.mean,
            "throughput_per_s": self.throughput,
            "macs": self.macs,
            "latencies_ms": list(self.latencies_ms),
        }


@dataclass
class BenchResult:
    provider: str
    note: str | None
    config: BenchConfig
    models: list[str]
    timings: list[Timing]
    skipped: list[str]

    def timing(self, model: str, batch: int) -> Timing | None:
        return next((t for t in self.timings if t.model == model and t.batch == batch), None)

    def speedup(self, timing: Timing) -> float | None:
        base = self.timing(self.models[0], timing.batch)
        return base.p50 / timing.p50 if base else None

    def mac_reduction(self, timing: Timing) -> float | None:
        base = self.timing(self.models[0], timing.batch)
        if base is None or not base.macs or not timing.macs:
            return None
        return base.macs / timing.macs

    def efficiency(self, timing: Timing) -> float | None:
        speedup, reduction = self.speedup(timing), self.mac_reduction(timing)
        return speedup / reduction if speedup and reduction else None

    def to_markdown(self) -> str:
        """A Markdown table of the medians, as docs/benchmarks.md shows them."""
        lines = [
            "| model | batch | p50 ms | p90 ms | items/s | MACs | speedup | MAC reduction | efficiency |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in self.timings:
            cells = [
                Path(t.model).name,
                str(t.batch),
                f"{t.p50:.3f}",
                f"{t.percentile(90):.3f}",
                f"{t.throughput:.1f}",
                format_count(t.macs),
                _format(self.speedup(t), "{:.2f}×"),
                _format(self.mac_reduction(t), "{:.2f}×"),
                _format(self.efficiency(t), "{:.2f}"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        rows = []
        for timing in self.timings:
            rows.append(
                timing.to_dict()
                | {
                    "speedup": self.speedup(timing),
                    "mac_reduction": self.mac_reduction(timing),
                    "efficiency": self.efficiency(timing),
                }
            )
        return {
            "provider": self.provider,
            "note": self.note,
            "models": self.models,
            "batch_sizes": list(self.config.batch_sizes),
            "warmup": self.config.warmup,
            "runs": self.config.runs,
            "threads": self.config.threads,
            "tf32": self.config.tf32,
            "cpu_spinning": self.provider != "CPUExecutionProvider" or len(self.models) == 1,
            "cuda_graph": self.config.cuda_graph,
            "cuda_options": self.config.cuda_options(),
            "results": rows,
            "skipped": self.skipped,
        }


def _format(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _batched_shapes(
    model, batch: int, given: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]] | str:
    """Input shapes at ``batch``, or why this model cannot run at that batch size. The batch sits where
    each input declares the batch symbol (a recurrent state ``[layers, batch, hidden]``: axis 1); a
    declared scalar stays a scalar."""
    from lrdeploy.runtime.feeding import batch_axes

    shapes = resolve_shapes(model, given, strict=True)
    specs = model_inputs(model)
    axes = batch_axes(specs)
    batched = {}
    for spec in specs:
        shape, axis = shapes[spec.name], axes[spec.name]
        if axis is None or not shape:
            batched[spec.name] = tuple(shape or ())
            continue
        fixed = spec.dims[axis] if spec.dims and axis < len(spec.dims) else None
        if isinstance(fixed, int) and fixed != batch and spec.name not in given:
            return f"its batch dim is fixed to {fixed}"
        batched[spec.name] = (*shape[:axis], batch, *shape[axis + 1 :])
    return batched


class _Runner:
    """One model's session at one batch size, its inputs already where the provider wants them.

    On CUDA/TensorRT the inputs live on the GPU and the outputs are bound there (IO binding), so only the
    run is timed. With CUDA graphs the outputs must also have fixed addresses: they are allocated up front
    at the shapes onnx shape inference gives, and the first run records the graph that later runs replay.
    """

    def __init__(
        self, proto, path: Path, device: Device, config: BenchConfig, shapes, spinning: bool
    ) -> None:
        label = "a timed model" if isinstance(path, bytes) else str(path)
        self.label = label
        self.session = make_session(path, device, config.threads, spinning=spinning, label=label)
        feeds = random_feeds(proto, shapes, config.seed)
        self.binding = None
        if device.name == "cpu":
            self.feeds = feeds
            return
        from onnxruntime import OrtValue

        binding = self.session.io_binding()
        self._buffers = []
        for name, array in feeds.items():
            value = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)
            self._buffers.append(value)
            binding.bind_ortvalue_input(name, value)
        inferred = costs.infer_shapes(proto, shapes) if config.cuda_graph else {}
        for output in proto.graph.output:
            if not config.cuda_graph:
                binding.bind_output(output.name, "cuda", 0)
                continue
            shape = inferred.get(output.name)
            if shape is None or None in shape:
                raise UsageError(f"{option('cuda_graph')} needs a static shape for output '{output.name}'")
            dtype = helper.tensor_dtype_to_np_dtype(output.type.tensor_type.elem_type)
            value = OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", 0)
            self._buffers.append(value)
            binding.bind_ortvalue_output(output.name, value)
        self.binding = binding

    def __call__(self) -> float:
        """One run's wall time in milliseconds."""
        start = time.perf_counter_ns()
        try:
            if self.binding is not None:
                self.session.run_with_iobinding(self.binding)
            else:
                self.session.run(None, self.feeds)
        except Exception as error:  # onnxruntime's own exception types: one line, not a traceback
            raise RuntimeFailure(f"onnxruntime failed to run {self.label}: {summarize(error)}") from None
        return (time.perf_counter_ns() - start) / 1e6


def _interleave(
    runners: Mapping[str, Callable[[], float]], config: BenchConfig, tick: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Rounds of one run per model (A B A B …); the timed rounds' latencies per model."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(config.warmup + config.runs):
        for name, runner in runners.items():
            elapsed = runner()
            if round_index >= config.warmup:
                samples[name].append(elapsed)
        if tick:
            tick()
    return samples


def time_models(
    models: Mapping[str, onnx.ModelProto | tuple[onnx.ModelProto, bytes | Path]],
    device: Device,
    config: BenchConfig,
    shapes: Mapping[str, tuple[int, ...]],
    spinning: bool = False,
) -> dict[str, Timing]:
    """Time models side by side at one set of input shapes (the latency table's layers, the end-to-end
    check of `lrdeploy.runtime.latency`), with the same rounds as `benchmark`. A model is a proto, or a
    proto with what onnxruntime should load for it (its file, or bytes). CPU spinning is off unless
    asked, also for one model, so that layers and whole models are timed alike."""
    spinning = spinning or device.name != "cpu"
    runners = {}
    for name, model in models.items():
        proto, source = model if isinstance(model, tuple) else (model, model.SerializeToString())
        runners[name] = _Runner(proto, source, device, config, shapes, spinning)
    samples = _interleave(runners, config)
    batch = next(iter(shapes.values()))[0] if shapes else 1
    return {name: Timing(name, batch, tuple(samples[name]), None) for name in models}


def benchmark(
    models: Sequence[str | os.PathLike],
    config: BenchConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Time every model at every batch size, interleaved; the first model is the baseline."""
    config = config or BenchConfig()
    if not models:
        raise UsageError("give at least one model to benchmark")
    device = select_device(
        config.device, tf32=config.tf32, cuda_graph=config.cuda_graph, cuda_options=config.cuda_options()
    )
    if config.cuda_graph and device.name != "cuda":
        raise UsageError(f"{option('cuda_graph')} needs the CUDA EP; this run uses {device.provider}")
    loaded = []
    for model in models:
        proto, path = load_model(model)
        name_nodes(proto.graph)  # our copy (sessions read the file): MACs are counted by unique node name
        loaded.append((str(model), proto, path))
    # onnxruntime's CPU workers busy-wait after each run; with several sessions alive, the idle ones'
    # spinning steals the cores from the one being timed (ResNet-50, 2 cores: 38 ms alone, 83 ms
    # interleaved with four others). Interleaved CPU runs therefore turn spinning off for every model.
    spinning = device.name != "cpu" or len(loaded) == 1
    timings, skipped = [], []
    total = len(config.batch_sizes) * (config.runs + config.warmup)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    for batch in config.batch_sizes:
        active, runners = [], {}
        for name, proto, path in loaded:
            shapes = _batched_shapes(proto, batch, config.input_shapes)
            if isinstance(shapes, str):
                skipped.append(f"{name} at batch {batch}: {shapes}")
                continue
            runners[name] = _Runner(proto, path, device, config, shapes, spinning)
            # the same total as the report: the costlier branch of each If, one pass of each loop body
            active.append((name, scoped_total(proto.graph, costs.count_macs(proto, shapes))[0]))
        samples = _interleave(runners, config, tick)
        timings.extend(Timing(name, batch, tuple(samples[name]), macs) for name, macs in active)
    return BenchResult(device.provider, device.note, config, [m for m, _, _ in loaded], timings, skipped)
