"""Issue 12: a MAC budget on a model whose layers sit in the branches of an If, against the same layers
without the If — planned, achieved (the report's count) and the planning time, side by side in one run.

    python benchmarks/branch_budget.py                          # 2 branches × 24 layers of 256, shared 2
    python benchmarks/branch_budget.py --layers 48 --width 512 --targets 0.8 0.5 0.3

The model (seeded, random weights with decaying spectra): x [1, W] → If(flag): each branch a chain of
``--layers`` MatMul → Relu of W×W (the else branch at 3/4 of the width inside, so the branches differ),
``--shared`` of them reading a weight that both branches read. The flat model is the then branch alone
in the main graph. Each budget is planned with ``compress(target_macs=F, verify=False)``; ``plan_s`` is
the report's plan time (spectra + allocation), the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lrdeploy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from control_flow import weight  # noqa: E402


def _chain(rng, tag: str, layers: int, width: int, inner: int, shared: int, source: str):
    """MatMul → Relu chains; returns (nodes, initializers, output name)."""
    nodes, inits, current = [], [], source
    for i in range(layers):
        name = f"w_shared{i}" if i < shared else f"{tag}_w{i}"
        odd = i >= shared and (i - shared) % 2 == 1
        rows, cols = (width, width) if i < shared else (inner, width) if odd else (width, inner)
        if i >= shared:
            inits.append(numpy_helper.from_array(weight(rng, rows, cols, scale=0.3), name))
        nodes.append(helper.make_node("MatMul", [current, name], [f"{tag}_m{i}"], f"{tag}_mm{i}"))
        nodes.append(helper.make_node("Relu", [f"{tag}_m{i}"], [f"{tag}_r{i}"], f"{tag}_relu{i}"))
        current = f"{tag}_r{i}"
    return nodes, inits, current


def models(layers: int, width: int, shared: int, seed: int = 0) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(the If model, the flat model with the then branch's layers in the main graph)."""
    rng = np.random.default_rng(seed)
    layers += (layers - shared) % 2  # an even chain after the shared layers ends at the width it starts with
    inner = width * 3 // 4
    outer = [
        numpy_helper.from_array(weight(rng, width, width, scale=0.3), f"w_shared{i}") for i in range(shared)
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])
    branches = {}
    for tag, size in (("then", width), ("else", inner)):
        nodes, inits, last = _chain(rng, tag, layers, width, size, shared, "x")
        nodes.append(helper.make_node("Identity", [last], [f"{tag}_y"], f"{tag}_out"))
        out = [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, None)]
        branches[f"{tag}_branch"] = helper.make_graph(nodes, tag, [], out, inits)
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], "If_0", **branches)], "g", [x, flag], [y], outer
    )
    branched = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    nodes, inits, last = _chain(np.random.default_rng(seed), "flat", layers, width, width, 0, "x")
    nodes.append(helper.make_node("Identity", [last], ["y"], "out"))
    flat = helper.make_model(
        helper.make_graph(nodes, "flat", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=10,
    )
    return branched, flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--shared", type=int, default=2)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.5, 0.3])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    branched, flat = models(args.layers, args.width, args.shared)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {args}")
    print("| model | target | planned | achieved (report) | plan_s (median) |")
    print("|---|---|---|---|---|")
    for target in args.targets:
        for name, model in (("If, 2 branches", branched), ("flat", flat)):
            times, report = [], None
            for _ in range(args.repeat):
                _, report = lrdeploy.compress(model, target_macs=target, verify=False)
                times.append(report.timings["plan"])
            assert report is not None and report.budget is not None
            achieved = report.macs_after / report.macs_before
            row = f"| {name} | {target:g} | {report.budget['planned']:.4f} | {achieved:.4f} |"
            print(f"{row} {statistics.median(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
