"""Latency-aware budgets on the CPU EP (issue 10): never slower than dense, and what latency awareness buys.

For each bundled MNIST model: ``--cost latency`` at a few budgets (each result's end-to-end check is
the compressor's own: p50 of interleaved runs, output vs input), and its accuracy in fp32, fp16 and
int8. For ResNet-50 (`make_resnet50.py`, seeded random weights): ``--target-latency 0.4`` and MAC
budgets (at the latency result's MACs and ``--mac-budgets``), each with its output error (rel. L2,
cosine on seeded random inputs), all timed side by side with the dense model (`lrdeploy.runtime.bench`,
interleaved medians); and the factorized model (ρ 0.25) quantized to int8 against the int8 dense model.

    python benchmarks/latency_budget.py [--out models/RESULTS_latency.json] [--skip-resnet]
    python benchmarks/latency_budget.py --skip-mnist --skip-int8 --fresh-table --workdir /tmp/latb --runs 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import lrdeploy
import lrdeploy.errors
from lrdeploy.runtime.bench import BenchConfig, benchmark
from lrdeploy.runtime.precision import to_int8

REPO = Path(__file__).resolve().parents[1]
MNIST = ("lenet5_baseline", "mlp_baseline", "vgg_baseline")
THREADS = 2
#: The issue's ResNet-50 latency target (a fraction of the dense model's measured latency).
TARGET = 0.4


def _accuracy(report) -> tuple[float | None, float | None]:
    v = report.verification
    return (v.accuracy_original, v.accuracy_compressed) if v is not None else (None, None)


def _row(name: str, budget: str, report, seconds: float) -> dict:
    lat = report.latency or {}
    before, after = _accuracy(report)
    return {
        "model": name,
        "budget": budget,
        "factorized": len(report.factorized),
        "macs": report.macs_after / report.macs_before if report.macs_before else None,
        "predicted": lat.get("predicted_ms", 0) / lat["dense_predicted_ms"] if lat else None,
        "input_ms": lat.get("measured_input_ms"),
        "output_ms": lat.get("measured_output_ms"),
        "speedup": lat.get("speedup"),
        "reverted": len(lat.get("reverted", [])),
        "profiled": lat.get("profiled"),
        "accuracy": [before, after],
        "rel_l2": report.verification.rel_l2 if report.verification else None,
        "cosine": report.verification.cosine if report.verification else None,
        "calibration": lat.get("calibration"),
        "seconds": round(seconds, 1),
    }


def _compress(model, **options):
    start = time.perf_counter()
    try:
        _, report = lrdeploy.compress(model, device="cpu", **options)
    except lrdeploy.errors.LrdeployError as error:
        return None, str(error), time.perf_counter() - start
    return report, None, time.perf_counter() - start


def mnist_rows() -> list[dict]:
    rows = []
    for name in MNIST:
        path = REPO / "models" / f"{name}.onnx"
        budgets = [
            ("--cost latency --target-macs 0.5", {"cost": "latency", "target_macs": 0.5}),
            ("--target-latency 0.95", {"target_latency": 0.95}),
            ("--target-latency 0.9", {"target_latency": 0.9}),
            ("--batch 32 --target-latency 0.8", {"target_latency": 0.8, "latency_batch": 32}),
            (
                "--batch 32 --cost latency --target-macs 0.7",
                {"cost": "latency", "target_macs": 0.7, "latency_batch": 32},
            ),
        ]
        for label, options in budgets:
            report, error, seconds = _compress(path, data="mnist", threads=THREADS, **options)
            rows.append(
                _row(name, label, report, seconds)
                if report
                else {"model": name, "budget": label, "error": error}
            )
            print(json.dumps(rows[-1]), flush=True)
        for precision in ({}, {"precision": "fp16"}, {"quantize": "int8", "calib": "mnist", "method": "svd"}):
            report, error, seconds = _compress(path, data="mnist", rank_ratio=0.5, **precision)
            label = "--rank-ratio 0.5 " + (" ".join(f"--{k} {v}" for k, v in precision.items()) or "(fp32)")
            row = {"model": name, "budget": label, "error": error}
            if report:
                row = _row(name, label, report, seconds) | {"precision": report.precision}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def resnet_rows(work: Path, runs: int, mac_budgets: list[float], int8: bool) -> list[dict]:
    """``--target-latency 0.4`` (twice: the second run reads the cached table and calibration), the MAC
    budgets (the latency result's MACs and ``mac_budgets``), each with its output error on seeded random
    inputs, then all of them timed side by side against the dense model."""
    model = work / "resnet50_bn.onnx"
    if not model.exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks/make_resnet50.py"), str(model)], check=True)
    common = {"random_batches": 1, "batch_size": 4}
    rows, outputs = [], {}
    label = f"--target-latency {TARGET}"
    for run, name in enumerate((label, f"{label} (second run: cached table and calibration)")):
        start = time.perf_counter()
        output = work / "latency.onnx" if run == 0 else None
        _, report = lrdeploy.compress(
            model, target_latency=TARGET, output=output, device="cpu", threads=THREADS, **common
        )
        rows.append(_row("resnet50", name, report, time.perf_counter() - start))
        print(json.dumps(rows[-1]), flush=True)
        if run == 0:
            first = report
    outputs[label] = work / "latency.onnx"
    reached = round(first.macs_after / first.macs_before, 3)
    for budget in sorted({reached, *mac_budgets}):
        path = work / f"macs{budget}.onnx"
        start = time.perf_counter()
        _, report = lrdeploy.compress(model, target_macs=budget, output=path, device="cpu", **common)
        same = " (the latency result's MACs)" if budget == reached else ""
        rows.append(_row("resnet50", f"--target-macs {budget}{same}", report, time.perf_counter() - start))
        print(json.dumps(rows[-1]), flush=True)
        outputs[f"--target-macs {budget}"] = path
    return [*rows, *timing_rows(work, runs, [model, *outputs.values()], list(outputs), int8)]


def timing_rows(work: Path, runs: int, models: list[Path], labels: list[str], int8: bool) -> list[dict]:
    """Side by side: the dense model and the compressed ones (their p50 ÷ the dense p50 per label); then,
    with ``int8``, int8 dense vs int8 factorized (ρ 0.25), both calibrated on the same 16 seeded random
    images. Files already in ``work`` are reused."""
    config = BenchConfig(device="cpu", threads=THREADS, runs=runs, warmup=3)
    result = benchmark([str(m) for m in models], config)
    table = result.to_markdown()
    print(table, flush=True)
    base = result.timings[0].p50
    ratios = {label: t.p50 / base for label, t in zip(labels, result.timings[1:], strict=False)}
    print(json.dumps({"measured_ratio": ratios}), flush=True)
    rows: list[dict] = [{"bench": table, "measured_ratio": ratios, "load_average": os.getloadavg()}]
    if not int8:
        return rows
    calib = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
    factorized, dense = work / "r0.25_int8.onnx", work / "dense_int8.onnx"
    if not factorized.exists():
        lrdeploy.compress(
            models[0],
            rank_ratio=0.25,
            quantize="int8",
            calib=calib,
            calib_samples=16,
            method="svd",
            output=factorized,
            verify=False,
        )
    if not dense.exists():
        from lrdeploy.runtime.datasets import ImageOptions, as_data_source

        onnx.save(to_int8(onnx.load(models[0]), as_data_source(calib), ImageOptions(), 16, 16), dense)
    quantized = benchmark([str(dense), str(factorized)], config).to_markdown()
    print(quantized, flush=True)
    return [*rows, {"int8": quantized}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "models" / "RESULTS_latency.json")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-mnist", action="store_true")
    parser.add_argument("--skip-int8", action="store_true", help="no int8 ResNet-50 timing")
    parser.add_argument(
        "--mac-budgets",
        type=float,
        nargs="*",
        default=[0.1, 0.2, 0.3],
        help="ResNet-50 MAC budgets compared with the latency budget (its own MACs are always one)",
    )
    parser.add_argument(
        "--fresh-table",
        action="store_true",
        help="measure the latency tables afresh (LRDEPLOY_CACHE=WORKDIR/cache, emptied first)",
    )
    parser.add_argument(
        "--timing-only", nargs="+", type=Path, help="only time these models (the first is dense) and int8"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="latency_budget_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.fresh_table:
        shutil.rmtree(work / "cache", ignore_errors=True)
        os.environ["LRDEPLOY_CACHE"] = str(work / "cache")
    if args.timing_only:
        labels = [m.name for m in args.timing_only[1:]]
        rows = timing_rows(work, args.runs, args.timing_only, labels, not args.skip_int8)
        args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        return
    rows = [] if args.skip_mnist else mnist_rows()
    if not args.skip_resnet:
        rows += resnet_rows(work, args.runs, args.mac_budgets, not args.skip_int8)
    document = {
        "machine": "this project's 2-core CPU container, shared with other jobs",
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }
    document["seconds"] = round(time.perf_counter() - start, 1)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out} ({document['seconds']} s)")


if __name__ == "__main__":
    main()
