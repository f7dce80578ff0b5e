"""Calibration cost on ResNet-50 against the onnxruntime forward pass of the same images (issue 9: ≤ 3×).

The ResNet-50 of `make_resnet50.py` (seeded weights), BN folded as ``compress`` folds it, and 64 seeded
random images at 224² (no real images ship with the project; timing does not depend on the pixels), fed
in batches of 32 as ``--calib`` feeds them. Each round times, back to back, the plain forward pass of
the images and ``collect_moments`` over them (exact rows, 20% held apart: what ``compress --calib`` runs);
medians over the rounds. One more pass splits the cost in CPU seconds per part (the numpy parts on one
BLAS thread, one layer after another): building the capture session (shape inference, the Gram nodes,
onnxruntime's optimizer), the onnxruntime runs (the forward pass plus the Grams formed in the graph,
`lrdeploy.planning.gramgraph`), summing their float32 products in float64, the border-strip corrections
of the stride-1 convs' shift products, layers on the numpy path, and folding the pending sums into row
order. Every path runs in every round, side by side: ``numpy`` (every layer input copied out of
onnxruntime into fresh arrays and summed while it runs the next batch, the default of ``compress
--calib``), ``numpy-reused`` (written by onnxruntime into arrays reused from batch to batch, summed
before the next run) and ``graph`` (the Grams formed inside onnxruntime); ``--paths`` picks some.
The split is taken for each path timed, and the numpy path's floor is stated: its products at this
machine's GEMM rate plus the capture run.
``--eigh`` also times the eigendecompositions that whitening needs for the widest layers (they belong
to the factorization, not to calibration).

    python benchmarks/calib_speed.py --rounds 3   # writes models/RESULTS_calib_speed.md
    python benchmarks/calib_speed.py --eigh 1     # + the 4,608² eigendecompositions (minutes each)
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import scipy.linalg
from make_resnet50 import build_resnet50
from threadpoolctl import threadpool_limits

from lrdeploy.io.graphio import from_graph
from lrdeploy.io.modelio import materialize
from lrdeploy.pipeline import prepare_graph
from lrdeploy.planning import calibrate, capture, flatgram
from lrdeploy.planning.calibrate import LayerInput, LayerMoments, SecondMoment, collect_moments
from lrdeploy.planning.capture import Capture
from lrdeploy.planning.costs import count_macs
from lrdeploy.planning.rowforms import conv_pads, ints
from lrdeploy.planning.whiten import WhitenedSpectrum
from lrdeploy.runtime.sessions import Device, make_session


def _folded(workdir: Path) -> onnx.ModelProto:
    path = workdir / "resnet50_bn.onnx"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        onnx.save(build_resnet50(), path)
    original = onnx.load(path)
    graph, *_ = prepare_graph(original, fold_bn=True)
    return materialize(from_graph(graph, original, original.ir_version))


def _kernel_share(before: resource.struct_rusage, after: resource.struct_rusage) -> tuple[float, ...]:
    """(CPU s, of which in the kernel, minor page faults in millions) between two readings."""
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return user + system, system, (after.ru_minflt - before.ru_minflt) / 1e6


def _forward(session, feeds: list[dict[str, np.ndarray]]) -> float:
    start = time.perf_counter()
    for feed in feeds:
        session.run(None, feed)
    return time.perf_counter() - start


#: Calibration paths: (`calibrate.IN_GRAPH`, `capture.REUSE_OUTPUTS`) for each.
PATHS = {"numpy": (False, False), "numpy-reused": (False, True), "graph": (True, False)}


def _use(path: str) -> None:
    calibrate.IN_GRAPH, capture.REUSE_OUTPUTS = PATHS[path]


def _split(model: onnx.ModelProto, layers: list[LayerInput], feeds: list[dict[str, np.ndarray]]) -> dict:
    """CPU seconds of each part, the numpy parts one layer after another on one BLAS thread."""
    names = [
        "capture session build",
        "onnxruntime runs (forward + in-graph Grams)",
        "sum of in-graph products",
        "shift border corrections",
        "numpy-path layers",
        "fold",
    ]
    parts = dict.fromkeys(names, 0.0)
    moments = {layer.node: LayerMoments(SecondMoment(layer.dim), SecondMoment(layer.dim)) for layer in layers}
    capturing = Capture(model, layers, 5, None, calibrate.IN_GRAPH, calibrate._SHIFT_CHANNELS)
    start = time.process_time()
    capturing.prepare(feeds[0])
    parts[names[0]] += time.process_time() - start
    with threadpool_limits(1, user_api="blas"):
        for batch, feed in enumerate(feeds, 1):
            start = time.process_time()  # onnxruntime's threads
            values, grams = capturing.run(feed, moments, batch)
            parts[names[1]] += time.process_time() - start
            for layer in layers:
                x = values.get(layer.tensor, feed.get(layer.tensor))
                start = time.thread_time()
                if layer.node in grams:
                    grams[layer.node].add(moments[layer.node], x)
                    shift = grams[layer.node].plan.kind == "shift"
                    parts[names[3] if shift else names[2]] += time.thread_time() - start
                else:
                    calibrate._split(layer, x, moments[layer.node], 5)
                    parts[names[4]] += time.thread_time() - start
        start = time.thread_time()
        for moment in moments.values():
            _ = moment.fit.total, moment.holdout.total
        parts[names[5]] += time.thread_time() - start
    parts["moments"] = {node: m.fit for node, m in moments.items()}
    parts["gram GMAC per image"] = sum(_macs(plan) for plan in capturing.plans.values()) / 1e9
    shapes = [np.shape(values.get(layer.tensor, feed.get(layer.tensor))) for layer in layers]
    numpy_macs = sum(
        _numpy_macs(layer, shape) for layer, shape in zip(layers, shapes, strict=True) if len(shape) == 4
    )
    parts["numpy GMAC per image"] = numpy_macs / len(feed["input"]) / 1e9
    return parts


def _numpy_macs(layer: LayerInput, shape: tuple[int, ...]) -> float:
    """Multiply-adds of the numpy path's products for one batch of this shape, as `calibrate._fast_conv`
    chooses them (1×1: one symmetric product; stride 1: shift products and bands; else im2col)."""
    if layer.op != "Conv":
        return shape[0] * layer.dim**2 / 2
    samples, channels, height, width = shape
    strides = ints(layer.attrs, "strides", [1, 1])
    begin, end = conv_pads(shape[2:], layer.attrs, layer.kernel_shape)
    dilations = ints(layer.attrs, "dilations", [1, 1])
    if tuple(layer.kernel_shape) == (1, 1) and not any(begin) and not any(end):
        return samples * -(-height // strides[0]) * -(-width // strides[1]) * channels**2 / 2
    windows = flatgram._Windows(shape[2:], begin, end, dilations, layer.kernel_shape)
    if (
        strides == [1, 1]
        and channels >= calibrate._SHIFT_CHANNELS
        and flatgram.shifts_cost_less(shape[2:], begin, end, dilations, layer.kernel_shape)
    ):
        return windows.cost(samples) * channels**2
    rows = [
        (size + b + e - (k - 1) * d - 1) // s + 1
        for size, b, e, k, d, s in zip(
            shape[2:], begin, end, layer.kernel_shape, dilations, strides, strict=True
        )
    ]
    return samples * rows[0] * rows[1] * layer.dim**2 / 2


def _forward_macs(model: onnx.ModelProto) -> float:
    """The forward pass's multiply-adds per 224² image (Conv and Gemm)."""
    return float(sum(m or 0 for m in count_macs(model, {"input": (1, 3, 224, 224)}).values()))


def _gemm_rate() -> float:
    """One thread's float32 GEMM rate on this machine, GMAC/s (1,024 × 4,096 × 1,024, best of 5)."""
    a = np.random.default_rng(0).standard_normal((1024, 4096)).astype(np.float32)
    best = float("inf")
    with threadpool_limits(1, user_api="blas"):
        for _ in range(5):
            start = time.thread_time()
            _ = a @ a[::-1].T
            best = min(best, time.thread_time() - start)
    return 1024 * 4096 * 1024 / best / 1e9


def _macs(plan) -> float:
    """Multiply-adds per sample of one layer's in-graph Gram products."""
    if plan.kind == "shift":
        return plan.spatial[0] * plan.spatial[1] * plan.channels**2 * len(plan.deltas)
    blocks = zip(plan.blocks[:-1], plan.blocks[1:], strict=True)
    return plan.rows_per_sample * sum((stop - start) * (plan.dim - start) for start, stop in blocks)


def _eigh(
    layers: list[LayerInput], moments: dict[str, SecondMoment], model: onnx.ModelProto, count: int
) -> list:
    """(layer, n, numpy eigh s, scipy evr s, scipy evd s, WhitenedSpectrum.of s) for the widest layers."""
    weights = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    rows = []
    for layer in sorted(layers, key=lambda layer: -layer.dim)[:count]:
        c = moments[layer.node].matrix
        weight = onnx.numpy_helper.to_array(weights[nodes[layer.node].input[1]]).reshape(layer.outputs, -1)
        timings = []
        for solve, arguments in (
            (np.linalg.eigh, {}),
            (scipy.linalg.eigh, {"driver": "evr"}),
            (scipy.linalg.eigh, {"driver": "evd"}),
            (lambda c, w=weight: WhitenedSpectrum.of(w, c), {}),
        ):
            start = time.perf_counter()
            solve(c, **arguments)
            timings.append(time.perf_counter() - start)
        rows.append((layer.node, layer.dim, *timings))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--eigh", type=int, default=0, help="time the eigendecompositions of this many layers"
    )
    parser.add_argument(
        "--narrower",
        type=int,
        default=0,
        help="only layers of fewer input rows' width than this (a run under ~1 GB; 0: every layer)",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=list(PATHS),
        default=list(PATHS),
        help="numpy: every layer input copied out of onnxruntime (the default); graph: Grams inside it",
    )
    parser.add_argument("--workdir", type=Path, default=Path("out/bench"))
    parser.add_argument("--output", type=Path, default=Path("models/RESULTS_calib_speed.md"))
    args = parser.parse_args()
    default_path = (calibrate.IN_GRAPH, capture.REUSE_OUTPUTS)
    began = time.perf_counter()
    model = _folded(args.workdir)
    weights = {t.name: t for t in model.graph.initializer}
    layers = [LayerInput.of(n, weights) for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    layers = [layer for layer in layers if not args.narrower or layer.dim < args.narrower]
    images = np.random.default_rng(0).standard_normal((args.images, 3, 224, 224)).astype(np.float32)
    feeds = [{"input": images[i : i + args.batch]} for i in range(0, args.images, args.batch)]
    session = make_session(model.SerializeToString(), Device("cpu"))
    session.run(None, feeds[0])  # warm up
    rounds: dict[str, list[tuple[float, float]]] = {path: [] for path in args.paths}
    kernel: dict[str, list[tuple[float, float, float]]] = {path: [] for path in args.paths}
    for _ in range(args.rounds):
        for path in args.paths:
            _use(path)
            forward = _forward(session, feeds)
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            collect_moments(model, [layer.node for layer in layers], feeds, holdout_every=5)
            rounds[path].append((forward, time.perf_counter() - start))
            kernel[path].append(_kernel_share(before, resource.getrusage(resource.RUSAGE_SELF)))
            f, c = rounds[path][-1]
            print(f"{path}: forward {f:.1f} s, calibration {c:.1f} s ({c / f:.2f}×)", flush=True)
    forward_cpu = time.process_time()
    _forward(session, feeds)
    forward_cpu = time.process_time() - forward_cpu
    splits, moments, gram_macs, numpy_macs = {}, None, 0.0, 0.0
    for path in args.paths:
        _use(path)
        parts = _split(model, layers, feeds)
        moments = parts.pop("moments")
        numpy_macs = numpy_macs if PATHS[path][0] else parts.pop("numpy GMAC per image")
        parts.pop("numpy GMAC per image", None)
        macs = parts.pop("gram GMAC per image")
        gram_macs = macs if PATHS[path][0] else gram_macs
        splits[path] = parts
        print(path + ": " + ", ".join(f"{name} {sec:.1f} CPU s" for name, sec in parts.items()), flush=True)
    calibrate.IN_GRAPH, capture.REUSE_OUTPUTS = default_path
    eighs = _eigh(layers, moments, model, args.eigh)
    machine = (
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average "
        + ", ".join(f"{v:.1f}" for v in os.getloadavg())
    )
    default = next(name for name, value in PATHS.items() if value == default_path)
    lines = [
        "# Calibration cost: ResNet-50, 64 images at 224² (issue 9: ≤ 3× the forward time)",
        "",
        f"`python benchmarks/calib_speed.py --rounds {args.rounds} --eigh {args.eigh}"
        + (f" --paths {' '.join(args.paths)}" if args.paths != list(PATHS) else "")
        + (f" --narrower {args.narrower}" if args.narrower else "")
        + f"` on {machine}",
        f"at the end; the whole script took {time.perf_counter() - began:.0f} s. Seeded random images,",
        f"batches of {args.batch}, exact rows (every im2col patch), 20% held apart. Each round times the",
        "plain forward pass and then the calibration, once per path, one after the other. Paths: `numpy`",
        "(every layer input copied out into fresh arrays, summed in numpy while onnxruntime runs the next",
        "batch), `numpy-reused` (written by onnxruntime into arrays reused from batch to batch, summed",
        "before the next run), `graph` (the Grams formed inside onnxruntime, `gramgraph.py`);",
        f"`compress --calib` runs `{default}`. Wall times, medians:",
        "",
        *(
            [f"Only the {len(layers)} layers whose rows are narrower than {args.narrower} (of 54).", ""]
            if args.narrower
            else []
        ),
        "| path | forward s | calibration s | **ratio** (median of the rounds') | rounds' ratios |",
        "|---|---|---|---|---|",
        *[
            f"| {path} | {statistics.median(f for f, _ in runs):.1f} | "
            f"{statistics.median(c for _, c in runs):.1f} | "
            f"**{statistics.median(c / f for f, c in runs):.2f}×** | "
            + ", ".join(f"{c / f:.2f}×" for f, c in runs)
            + " |"
            for path, runs in rounds.items()
        ],
        "",
        "CPU of those calibrations (every thread, medians): "
        + "; ".join(
            f"{path} {statistics.median(c for c, _, _ in runs):.1f} CPU s, of which "
            f"{statistics.median(k for _, k, _ in runs):.1f} in the kernel "
            f"({statistics.median(m for _, _, m in runs):.2f} M minor page faults)"
            for path, runs in kernel.items()
        )
        + ". Kernel time here is mostly page faults: fresh memory is",
        "zeroed and, on VMs that hand freed pages back to the host, faulted in from the host.",
        "",
        "Split, one pass per path, CPU seconds (onnxruntime on its threads, numpy parts on one BLAS",
        f"thread; the plain forward pass took {forward_cpu:.1f} CPU s"
        + (f"; the in-graph Grams are {gram_macs:.2f} GMAC per image):" if gram_macs else "):"),
        "",
        "| part | " + " | ".join(f"{path} CPU s" for path in splits) + " |",
        "|---|" + "---|" * len(splits),
        *[
            f"| {name} | " + " | ".join(f"{parts[name]:.1f}" for parts in splits.values()) + " |"
            for name in next(iter(splits.values()))
        ],
        "| **total** | " + " | ".join(f"**{sum(parts.values()):.1f}**" for parts in splits.values()) + " |",
        "",
    ]
    if "numpy" in splits:
        rate = _gemm_rate()
        captured = splits["numpy"]["onnxruntime runs (forward + in-graph Grams)"]
        sums = numpy_macs * args.images / rate
        lines += [
            f"Floor of the numpy path: its products are {numpy_macs:.2f} GMAC per image (forward: "
            f"{_forward_macs(model) / 1e9:.2f});",
            f"one thread's float32 GEMM runs {rate:.0f} GMAC/s here (1,024 × 4,096 × 1,024), so the sums",
            f"alone need {sums:.1f} CPU s at that rate; with the capture run's {captured:.1f} CPU s, "
            f"**{(captured + sums) / forward_cpu:.2f}×**",
            "the forward pass's CPU time before any copy, fold or imperfect GEMM shape.",
            "",
        ]
    if eighs:
        lines += [
            "Factorization (not calibration): eigendecompositions of the widest layers' second moments,",
            "wall s:",
            "",
            "| layer | n | numpy eigh | scipy evr | scipy evd | whole `WhitenedSpectrum.of` |",
            "|---|---|---|---|---|---|",
            *[f"| {name} | {n} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} |" for name, n, a, b, c, d in eighs],
            "",
        ]
    text = "\n".join(lines)
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
