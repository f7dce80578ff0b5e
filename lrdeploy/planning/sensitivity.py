"""Layer sensitivity: the model's output error with one layer compressed alone, at a few ranks.

AIMET's greedy ratio selection measures this per layer and rank; the knapsack (`budget`) then
trades layers by their measured curves instead of their own truncation errors, which misjudge a layer
followed by a large gain, or a classifier whose every direction matters.

One onnxruntime session serves every measurement: the candidate layers' weights become graph inputs of
a copy of the BN-folded model, and each run feeds the original weights except the one layer's
approximation A·B (its factors at that rank, in the weight's storage layout; the same numbers as the
two-node pair up to float32 rounding). The error is Σ‖y − y₀‖² / Σ‖y₀‖² over every output and probe
sample: a squared relative error, so that small independent perturbations add up as the knapsack
assumes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from lrdeploy.planning.plan import Analysis, stored_product
from lrdeploy.runtime.sessions import Device, make_session

__all__ = ["GRID", "grid", "measure"]

#: Ranks measured per layer; the errors of the ranks between are interpolated.
GRID = 8


def grid(ranks: Sequence[int], points: int = GRID) -> list[int]:
    """``points`` ranks out of ``ranks`` (ascending), geometrically spaced, the first and last included."""
    if len(ranks) <= points:
        return list(ranks)
    positions = np.unique(np.round(np.geomspace(1, len(ranks), points)).astype(int) - 1)
    return [ranks[i] for i in positions]


def _with_weight_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``names`` are graph inputs instead."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept, moved = [], []
    for tensor in copy.graph.initializer:
        (moved if tensor.name in names else kept).append(tensor)
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    for tensor in moved:
        copy.graph.input.append(
            onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        )
    return copy


def _error(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    num = sum(
        float(np.sum((np.asarray(o, np.float64) - r) ** 2)) for o, r in zip(outputs, reference, strict=True)
    )
    den = sum(float(np.sum(r**2)) for r in reference)
    return num / den if den > 0 else 0.0


def measure(
    folded: onnx.ModelProto,
    analyses: Sequence[Analysis],
    ranks: Mapping[str, Sequence[int]],
    probe: Mapping[str, np.ndarray],
    whiten: bool,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 32,
) -> dict[str, list[tuple[int, float]]]:
    """(rank, model output error) for each analysed group named in ``ranks``, at those ranks. Weights held
    inside If/Loop/Scan bodies are not measured (the budget uses their truncation error)."""
    from onnx import numpy_helper

    main = {t.name for t in folded.graph.initializer}  # a weight inside an If/Loop body cannot be fed
    layers = [a for a in analyses if ranks.get(a.name) and a.group.view.weight.name in main]
    weights = {a.group.view.weight.name: a for a in layers}
    stored = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer if t.name in weights}
    session = make_session(
        _with_weight_inputs(folded, set(weights)).SerializeToString(),
        Device("cpu"),
        label="the sensitivity probe",
    )
    count = len(next(iter(probe.values())))
    if all(v.ndim and len(v) == count for v in probe.values()):
        batches = [{k: v[i : i + batch_size] for k, v in probe.items()} for i in range(0, count, batch_size)]
    else:  # a scalar input, a state batched on axis 1: the probe (≤ 64 samples) runs as one batch
        batches = [dict(probe)]

    def run(feed_weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        outputs = [session.run(None, {**batch, **feed_weights}) for batch in batches]
        return [np.concatenate([o[i] for o in outputs]).astype(np.float64) for i in range(len(outputs[0]))]

    reference = run(stored)
    total = sum(len(ranks[a.name]) for a in layers)
    curves: dict[str, list[tuple[int, float]]] = {}
    done = 0
    for analysis in layers:
        view = analysis.group.view
        curve = []
        for rank in ranks[analysis.name]:
            factors = analysis.factors(rank, whiten)
            approx = stored_product(view, factors.a, factors.b).astype(stored[view.weight.name].dtype)
            curve.append((rank, _error(run({**stored, view.weight.name: approx}), reference)))
            done += 1
            if progress:
                progress(done, total)
        curves[analysis.name] = curve
    return curves
