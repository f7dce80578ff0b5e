"""Prototype for issue 9: whitened factors and a global MAC budget on the bundled MNIST CNNs (BN folded).

    python benchmarks/whiten_mnist.py                      # lenet5_baseline + vgg_baseline, ~1 min on 2 cores
    python benchmarks/whiten_mnist.py --models models/vgg_baseline.onnx --calib 512

Uses the new modules directly (`lrdeploy.calibrate`, `lrdeploy.whiten`, `lrdeploy.allocate`), before they
are wired into ``compress``: BN is folded by the pipeline's own pass, every factorizable layer's input
second moment is collected on --calib training digits (20% held apart), and for each MAC budget (a
fraction of the whole model's MACs, non-factorizable layers counted as fixed) the rows are

- uniform ρ + svd: one rank ratio for every layer, the largest within the budget (today's --rank-ratio);
- uniform ρ + whiten: the same ranks, whitened factors (the gain of the factors alone);
- budget + svd: ranks from the allocator on each weight's truncation error, plain SVD factors;
- budget(calib) + svd: ranks from the allocator on plain SVD's output error on the calibration rows;
- budget + whiten: ranks from the allocator on the whitened output error, whitened factors (plain SVD
  where whitening does worse on the held-apart rows).

Each compressed layer is applied as the dense product A @ B written into the folded model (the same
numbers as the two-node pair, up to float32 rounding), and judged on the 2,000 bundled test digits by the
output (logits) relative L2 error against the folded model and by test accuracy.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lrdeploy import costs
from lrdeploy.allocate import Candidate, LayerShape, MacsCost, allocate
from lrdeploy.calibrate import collect_moments
from lrdeploy.datasets import mnist_path
from lrdeploy.graphio import from_graph
from lrdeploy.modelio import load_model, materialize
from lrdeploy.passes.lowrank_ops import WeightView
from lrdeploy.passes.names import name_nodes
from lrdeploy.pipeline import prepare_graph
from lrdeploy.plan import find_groups
from lrdeploy.policy import round_half_up
from lrdeploy.runtime import Device, make_session
from lrdeploy.spectrum import Spectrum
from lrdeploy.whiten import FLOOR, WhitenedSpectrum, choose_factors, component_errors

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (0.75, 0.5, 0.3, 0.2)


@dataclass
class Layer:
    name: str
    view: WeightView
    weight: np.ndarray  # [m, n] float64
    shape: LayerShape
    plain: Spectrum
    whitened: WhitenedSpectrum
    svd_output_errors: np.ndarray  # plain SVD's output error on the fit rows, per rank
    fit: np.ndarray
    holdout: np.ndarray

    def ranks(self) -> list[int]:
        """Ranks whose pair saves parameters ("a pair must save")."""
        m, n = self.shape.m, self.shape.n
        return [r for r in range(1, min(m, n) + 1) if r * (m + n) < m * n]


def _stored(view: WeightView, matrix: np.ndarray) -> np.ndarray:
    """The [m, n] matrix back in the weight's storage layout."""
    if view.layout[0] == "Conv":
        return matrix.reshape(view.layout[1])
    if view.layout[0] == "Gemm" and view.layout[1]:
        return matrix
    return matrix.T


def _digits(split: str, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(mnist_path())
    x = data[f"x_{split}"][:count].astype(np.float32)[:, None] / 255.0
    return x, data[f"y_{split}"][:count]


def prepare(
    path: Path, calib: int, floor: float, damping: float
) -> tuple[onnx.ModelProto, list[Layer], float, dict[str, float]]:
    original, _ = load_model(path)
    name_nodes(original.graph)
    graph, _, _, _ = prepare_graph(original, fold_bn=True)
    groups, _ = find_groups(graph)
    views = {g.nodes[0].name: g.view for g in groups if not g.problem and len(g.nodes) == 1}
    folded = materialize(from_graph(graph, original, original.ir_version))
    input_name = folded.graph.input[0].name
    macs = costs.count_macs(folded, {input_name: (1, 1, 28, 28)})
    times: dict[str, float] = {}
    start = time.perf_counter()
    x, _ = _digits("train", calib)
    feeds = ({input_name: x[i : i + 32]} for i in range(0, len(x), 32))
    moments = collect_moments(folded, list(views), feeds, holdout_every=5)
    times["calibrate"] = time.perf_counter() - start
    start = time.perf_counter()
    layers = []
    for name, view in views.items():
        weight = np.asarray(view.matrix(), dtype=np.float64)
        fit, holdout = moments[name].fit.matrix, moments[name].holdout.matrix
        plain = Spectrum.of(weight)
        a, b = plain.factors(weight, plain.full_rank)
        shape = LayerShape(view.m, view.n, positions=int(macs[name]) // (view.m * view.n))
        whitened = WhitenedSpectrum.of(weight, fit, floor=floor, damping=damping)
        layers.append(
            Layer(name, view, weight, shape, plain, whitened, component_errors(a, b, fit), fit, holdout)
        )
    times["spectra"] = time.perf_counter() - start
    return folded, layers, float(sum(v for v in macs.values() if v)), times


def _uniform(layers: list[Layer], budget: float, fixed: float) -> dict[str, int | None]:
    """The largest rank ratio (multiple of 0.005) whose MACs fit, as --rank-ratio would give."""
    model = MacsCost()
    for ratio in np.arange(1.0, 0.0, -0.005):
        ranks: dict[str, int | None] = {}
        for layer in layers:
            rank = max(1, round_half_up(ratio * min(layer.shape.m, layer.shape.n)))
            ranks[layer.name] = rank if rank in layer.ranks() else None
        if fixed + sum(model.cost(layer.shape, ranks[layer.name]) for layer in layers) <= budget:
            return ranks
    raise SystemExit("no rank ratio fits the budget")


def _allocated(layers: list[Layer], budget: float, fixed: float, source: str) -> dict[str, int | None]:
    model = MacsCost()
    table = {"(fixed)": [Candidate(None, 0.0, fixed)]}
    for layer in layers:
        if source == "weight":
            errors = 1.0 - layer.plain.energy
            options = {r: float(errors[r - 1]) for r in layer.ranks()}
        elif source == "svd-output":
            options = {r: float(layer.svd_output_errors[r]) for r in layer.ranks()}
        else:
            options = {r: float(layer.whitened.errors[r]) for r in layer.ranks()}
        table[layer.name] = [Candidate(None, 0.0, model.cost(layer.shape, None))] + [
            Candidate(r, e, model.cost(layer.shape, r)) for r, e in options.items()
        ]
    choice = allocate(table, budget)
    return {layer.name: choice[layer.name].rank for layer in layers}


def _apply(
    folded: onnx.ModelProto, layers: list[Layer], ranks: dict[str, int | None], whiten: bool
) -> tuple[onnx.ModelProto, list[str]]:
    model = onnx.ModelProto()
    model.CopyFrom(folded)
    weights = {t.name: t for t in model.graph.initializer}
    fallbacks = []
    for layer in layers:
        rank = ranks[layer.name]
        if rank is None:
            continue
        if whiten:
            chosen = choose_factors(layer.weight, rank, layer.whitened, layer.plain, layer.fit, layer.holdout)
            a, b = chosen.a, chosen.b
            if chosen.reason:
                fallbacks.append(layer.name)
        else:
            a, b = layer.plain.factors(layer.weight, rank)
        tensor = weights[layer.view.weight.name]
        dense = _stored(layer.view, a @ b).astype(numpy_helper.to_array(tensor).dtype)
        tensor.CopyFrom(numpy_helper.from_array(dense, tensor.name))
    return model, fallbacks


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = make_session(model.SerializeToString(), Device("cpu"))
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 250]})[0] for i in range(0, len(x), 250)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        type=Path,
        default=[ROOT / "models/lenet5_baseline.onnx", ROOT / "models/vgg_baseline.onnx"],
    )
    parser.add_argument(
        "--calib", type=int, default=256, help="training digits for calibration (20%% held apart)"
    )
    parser.add_argument("--floor", type=float, default=FLOOR, help="relative eigenvalue floor of C")
    parser.add_argument("--damping", type=float, default=0.0, help="added to C's eigenvalues, × their mean")
    args = parser.parse_args()
    x_test, y_test = _digits("test")
    for path in args.models:
        folded, layers, total, times = prepare(path, args.calib, args.floor, args.damping)
        fixed = total - sum(MacsCost().cost(layer.shape, None) for layer in layers)
        reference = _run(folded, x_test)
        dense_accuracy = float(np.mean(reference.argmax(1) == y_test))
        print(f"\n## {path.name}: dense {100 * dense_accuracy:.2f}%, {len(layers)} layers, {total:.3g} MACs")
        print(
            f"calibration ({args.calib} digits) {times['calibrate']:.2f} s, whiten {times['spectra']:.2f} s"
        )
        print("\n| MACs budget | rows | achieved | output rel. error | test accuracy | fallbacks |")
        print("|---|---|---|---|---|---|")
        for fraction in BUDGETS:
            budget = fraction * total
            uniform = _uniform(layers, budget, fixed)
            rows = {
                "uniform ρ + svd": (uniform, False),
                "uniform ρ + whiten": (uniform, True),
                "budget + svd": (_allocated(layers, budget, fixed, "weight"), False),
                "budget(calib) + svd": (_allocated(layers, budget, fixed, "svd-output"), False),
                "budget + whiten": (_allocated(layers, budget, fixed, "whiten"), True),
            }
            for label, (ranks, whiten) in rows.items():
                model, fallbacks = _apply(folded, layers, ranks, whiten)
                out = _run(model, x_test)
                error = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
                accuracy = float(np.mean(out.argmax(1) == y_test))
                spent = fixed + sum(MacsCost().cost(layer.shape, ranks[layer.name]) for layer in layers)
                print(
                    f"| {fraction:.2f} | {label} | {spent / total:.3f} | {error:.3f} | {100 * accuracy:.2f}% "
                    f"| {len(fallbacks)} |"
                )


if __name__ == "__main__":
    main()
