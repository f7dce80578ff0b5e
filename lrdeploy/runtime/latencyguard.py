"""The end-to-end guarantee of a latency budget: the output is timed against the input on the same EP.

While the output measures slower (p50 speedup below `NOT_SLOWER`, confirmed by a second measurement
whose rounds are pooled with the first), the factorized layers with the least predicted gain go back to
dense, a quarter of them per round; after `MAX_ROUNDS` every layer is dense, i.e. the output is the
BN-folded input. Measurements go through `lrdeploy.runtime.latency._measure` (the seam tests replace).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from lrdeploy.io.modelio import save_model
from lrdeploy.passes.factorize import Rewrite, factorize
from lrdeploy.planning.costmodels import Costing
from lrdeploy.runtime import latency
from lrdeploy.runtime.bench import BenchConfig
from lrdeploy.runtime.latency import MODEL_RUNS, MODEL_WARMUP, LatencyCost, timing_shapes
from lrdeploy.runtime.sessions import Device

if TYPE_CHECKING:
    from lrdeploy.config import CompressConfig
    from lrdeploy.planning.plan import LayerDecision

__all__ = ["MAX_ROUNDS", "NOT_SLOWER", "LatencyCheck", "gains_of", "guard", "never_slower", "predicted_ms"]

#: "Not slower": the output's p50 speedup over the input is at least this (2% is the run-to-run noise
#: of interleaved medians on the shared 2-core container).
NOT_SLOWER = 0.98
#: Rounds of reverting layers before every layer is dense.
MAX_ROUNDS = 6


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
    device, bench, _ = latency._settings(config)
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
            measured = latency._measure(
                {"input": original, "output": (compressed, path)}, device, bench, shapes
            )
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
    layers = model.scale * math.fsum(timing.at(ranks.get(name)) for name, timing in model.timings.items())
    return (costing.fixed or 0.0) + layers


def gains_of(costing: Costing, ranks: Mapping[str, int | None]) -> dict[str, float]:
    """Predicted ms saved per factorized layer at its rank (dense − pair)."""
    model = costing.model
    assert isinstance(model, LatencyCost)
    timings = model.timings
    return {name: model.scale * (timings[name].dense - timings[name].at(r)) for name, r in ranks.items() if r}


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
        graph, names, _, _ = prepare_graph(model, config.fold_bn, config.requantize)
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
