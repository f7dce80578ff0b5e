"""fp32 / fp16 / int8 accuracy of the bundled MNIST baselines, compressed (issue 10), and the int8 ablation.

Table 1: each model at ``--target-params 0.7 --calib mnist`` (the float model keeps its accuracy) and at
``--rank-ratio 0.5`` (continuity with models/RESULTS_latency.md) × ``--precision fp16`` / ``--quantize
int8``: accuracy on the 2,000 bundled test digits (the compressor's own verification) and weight bytes.
Table 2 (``--ablation``, on by default): the int8 settings tried on the factorized VGG at ``--rank-ratio
0.5``, where plain QDQ lost 2 points: onnxruntime's calibration methods, sample counts, symmetric ranges,
reduce_range, per-tensor weights, nodes kept in float, the pairs' middle tensors in int16, and the bias
correction lrdeploy applies by default. Each row: accuracy, top-1 agreement with the fp32 factorized model
and the relative L2 error of its logits, on the same 2,000 digits.

Table 3 (``--timing``): that VGG as fp32, int8 and int8 with ``middle="int16"``, timed side by side on
the CPU EP (`lrdeploy.runtime.bench`: interleaved medians, batch 32, 2 threads).

    python benchmarks/precision_table.py [--out models/RESULTS_precision.md] [--no-ablation] [--timing]

``--resnet-overhead DIR`` only times `to_int8` with and without the bias correction on ResNet-50
(`make_resnet50.py`, seeded random weights, factorized at ρ 0.25; 16 seeded random images as in
`latency_budget.py`) and prints it: what the correction costs a big model (one run per layer).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

import lrdeploy
from lrdeploy.runtime.datasets import ImageOptions, load_dataset
from lrdeploy.runtime.precision import _quiet, _Reader, middle_tensors, to_int8, weight_bytes

REPO = Path(__file__).resolve().parents[1]
MODELS = ("lenet5_baseline", "mlp_baseline", "vgg_baseline")
BUDGETS = {
    "--target-params 0.7 --calib mnist": {"target_params": 0.7, "calib": "mnist"},
    "--rank-ratio 0.5": {"rank_ratio": 0.5},
}
#: As the test gate and the CLI: int8 activations calibrated on 256 training digits.
SAMPLES = 256


def _precisions(budget: dict) -> dict[str, dict]:
    # int8 needs --calib; at --rank-ratio 0.5 keep the fp32 run's plain SVD factors (no whitening)
    int8 = {"quantize": "int8", "calib": "mnist", "calib_samples": SAMPLES}
    if "calib" not in budget:
        int8["method"] = "svd"
    return {"fp32": {}, "fp16": {"precision": "fp16"}, "int8": int8}


def main_rows() -> list[dict]:
    rows = []
    for name in MODELS:
        path = REPO / "models" / f"{name}.onnx"
        for label, budget in BUDGETS.items():
            row: dict = {"model": name, "budget": label}
            for precision, options in _precisions(budget).items():
                start = time.perf_counter()
                model, report = lrdeploy.compress(path, data="mnist", device="cpu", **budget | options)
                row[precision] = {
                    "accuracy": report.verification.accuracy_compressed,
                    "weight_bytes": weight_bytes(model),
                    "seconds": round(time.perf_counter() - start, 1),
                }
                row["original"] = report.verification.accuracy_original
            base = row["fp32"]["accuracy"]
            row["worst_points"] = max(abs(row[p]["accuracy"] - base) * 100 for p in ("fp16", "int8"))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _scored(reference: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict:
    error = logits - reference
    scale = np.linalg.norm(reference)
    return {
        "accuracy": float(np.mean(logits.argmax(1) == labels)),
        "agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))),
        "rel_l2": float(np.linalg.norm(error) / scale),
        # the part of the error that is the same for every digit (its mean), on the same scale
        "offset_l2": float(np.sqrt(len(error)) * np.linalg.norm(error.mean(axis=0)) / scale),
    }


def _quantize(model: onnx.ModelProto, samples: int = SAMPLES, **options) -> onnx.ModelProto:
    """onnxruntime's static QDQ with lrdeploy's settings changed by ``options`` (no bias correction)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from lrdeploy.planning.calibration import calibration_dataset

    dataset = calibration_dataset("mnist", model, ImageOptions(), samples)
    settings = {
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "activation_type": QuantType.QInt8,
        "weight_type": QuantType.QInt8,
    }
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True} | options.pop("extra", {})
    with tempfile.TemporaryDirectory() as folder, _quiet():
        source, target = Path(folder) / "f.onnx", Path(folder) / "q.onnx"
        onnx.save(model, source)
        reader = _Reader(iter(dataset.batches(32)))
        quantize_static(source, target, reader, **settings | options, extra_options=extra)
        return onnx.load(target)


def _variants(model: onnx.ModelProto) -> list[tuple[str, Callable[[], onnx.ModelProto]]]:
    from onnxruntime.quantization import CalibrationMethod, QuantType

    layers = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    pair_in = [n for n in layers if "_lowrank_in" in n]
    wide = [{"quant_type": QuantType.QInt16}]
    middles = middle_tensors(model)

    def product(**options) -> onnx.ModelProto:
        return to_int8(model, "mnist", ImageOptions(), options.pop("samples", SAMPLES), 32, **options)

    return [
        ("plain QDQ: MinMax, 256 samples, asymmetric activations (before)", lambda: _quantize(model)),
        ("calibration: Entropy", lambda: _quantize(model, calibrate_method=CalibrationMethod.Entropy)),
        ("calibration: Percentile", lambda: _quantize(model, calibrate_method=CalibrationMethod.Percentile)),
        ("64 samples", lambda: _quantize(model, samples=64)),
        ("1024 samples", lambda: _quantize(model, samples=1024)),
        ("symmetric activations", lambda: _quantize(model, extra={"ActivationSymmetric": True})),
        ("reduce_range (7-bit weights)", lambda: _quantize(model, reduce_range=True)),
        ("per-tensor weights", lambda: _quantize(model, per_channel=False)),
        ("bias kept in float (QuantizeBias off)", lambda: _quantize(model, extra={"QuantizeBias": False})),
        ("first pair in float", lambda: _quantize(model, nodes_to_exclude=layers[:2])),
        ("first and last pair in float", lambda: _quantize(model, nodes_to_exclude=layers[:2] + layers[-2:])),
        ("pairs' first nodes in float", lambda: _quantize(model, nodes_to_exclude=pair_in)),
        (
            "pairs' middle tensors int16",
            lambda: _quantize(model, extra={"TensorQuantOverrides": dict.fromkeys(middles, wide)}),
        ),
        ("**bias correction (lrdeploy's default)**", lambda: product()),
        ("bias correction, 128 samples", lambda: product(samples=128)),
        ("bias correction, 1024 samples", lambda: product(samples=1024)),
        ("bias correction + middle tensors int16 (`middle='int16'`)", lambda: product(middle="int16")),
    ]


def ablation_rows(work: Path, name: str = "vgg_baseline", budget: str = "--rank-ratio 0.5") -> list[dict]:
    import onnxruntime as ort

    float_path = work / f"{name}_fp32.onnx"
    lrdeploy.compress(REPO / "models" / f"{name}.onnx", output=float_path, verify=False, **BUDGETS[budget])
    model = onnx.load(float_path)
    dataset = load_dataset("mnist", model)

    def logits(candidate: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(candidate.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, batch)[0] for batch in dataset.batches(500)])

    reference = logits(model)
    rows = [{"model": name, "budget": budget, "variant": "fp32 (reference)"}]
    rows[0] |= _scored(reference, dataset.labels, reference)
    for label, make in _variants(model):
        start = time.perf_counter()
        quantized = make()
        row = {
            "model": name,
            "budget": budget,
            "variant": label,
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row | _scored(reference, dataset.labels, logits(quantized)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def timing_table(work: Path, name: str = "vgg_baseline", runs: int = 20) -> str:
    """fp32, int8 and int8 with int16 middle tensors of one factorized model, timed side by side."""
    from lrdeploy.runtime.bench import BenchConfig, benchmark

    paths = [work / f"{name}_{label}.onnx" for label in ("fp32", "int8", "int8_middle16")]
    lrdeploy.compress(REPO / "models" / f"{name}.onnx", output=paths[0], verify=False, rank_ratio=0.5)
    model = onnx.load(paths[0])
    for path, middle in zip(paths[1:], ("int8", "int16"), strict=True):
        onnx.save(to_int8(model, "mnist", ImageOptions(), SAMPLES, 32, middle=middle), path)
    config = BenchConfig(device="cpu", batch_sizes=(32,), warmup=3, runs=runs, threads=2)
    return benchmark([str(p) for p in paths], config).to_markdown()


def resnet_overhead(work: Path) -> dict:
    """Seconds of `to_int8` on the factorized ResNet-50 without and with the bias correction."""
    import subprocess
    import sys

    from lrdeploy.runtime.datasets import as_data_source

    dense, factorized = work / "resnet50_bn.onnx", work / "resnet50_r0.25.onnx"
    if not dense.exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks/make_resnet50.py"), str(dense)], check=True)
    if not factorized.exists():
        lrdeploy.compress(dense, rank_ratio=0.25, output=factorized, verify=False)
    model = onnx.load(factorized)
    calib = as_data_source(np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32))
    seconds = {}
    for correct in (False, True):
        start = time.perf_counter()
        to_int8(model, calib, ImageOptions(), 16, 16, correct_bias=correct)
        seconds["corrected" if correct else "plain"] = round(time.perf_counter() - start, 1)
    layers = sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    return {"model": "resnet50 rho 0.25", "layers": layers, "samples": 16, "seconds": seconds}


def _delta(row: dict, precision: str) -> float:
    return 100 * (row[precision]["accuracy"] - row["fp32"]["accuracy"])


def _summary(rows: list[dict]) -> list[str]:
    """The target (within 0.5 point of the fp32 compressed model) row by row, as measured."""
    fp16 = max(abs(_delta(r, "fp16")) for r in rows)
    lines = [f"fp16: every row within {fp16:.2f} point of its fp32 compressed model."]
    for label in BUDGETS:
        picked = [r for r in rows if r["budget"] == label]
        worst = max(picked, key=lambda r: abs(_delta(r, "int8")))
        lines.append(
            f"int8 at `{label}`: within {abs(_delta(worst, 'int8')):.2f} point ({worst['model']}: "
            f"{_delta(worst, 'int8'):+.2f})."
        )
    missed = [r for r in rows if r["worst_points"] > 0.5]
    if missed:
        names = ", ".join(f"{r['model']} at `{r['budget']}` ({r['worst_points']:.2f})" for r in missed)
        lines.append(f"Over the 0.5-point target: {names} — see below.")
    return [" ".join(lines)]


def _finding(ablation: list[dict]) -> list[str]:
    """Why the VGG lost accuracy in int8 and what fixed it, with this run's numbers."""
    rows = {r["variant"].split(" (")[0].strip("*"): r for r in ablation}
    reference, plain = rows["fp32"], rows["plain QDQ: MinMax, 256 samples, asymmetric activations"]
    fixed = rows["bias correction"]
    wide = rows["bias correction + middle tensors int16"]

    def said(r: dict) -> str:
        points = 100 * (r["accuracy"] - reference["accuracy"])
        return f"{points:+.2f} points, {100 * r['agreement']:.2f}% agreement, rel L2 {r['rel_l2']:.4f}"

    knobs = [r for r in ablation[2:] if "bias correction" not in r["variant"] and "int16" not in r["variant"]]
    best = min(knobs, key=lambda r: r["rel_l2"])
    return [
        "**Why the VGG lost 2 points, and the fix.** At ρ 0.5 the VGG keeps "
        f"{100 * reference['accuracy']:.2f}% (its logits are near ties), so any output error flips "
        f"digits. Plain QDQ: {said(plain)}, of which {plain['offset_l2']:.4f} is the same for every digit "
        f"({100 * (plain['offset_l2'] / plain['rel_l2']) ** 2:.0f}% of the squared error): rounding is "
        "not zero-mean when a value recurs — the images' background, and the constant it makes in every "
        "channel of a pair's rank-r middle tensor (an int8 rounding the dense model does not have), round "
        "the same way at every position of every image. onnxruntime's settings move that rounding but do "
        f"not remove it (table below; best: {best['variant']}, rel L2 {best['rel_l2']:.4f}). lrdeploy now "
        "corrects it (`lrdeploy.runtime.biascorrect`, empirical bias correction, Nagel et al. 2019): each "
        "Conv/Gemm's int32 bias is shifted by the mean per-channel difference between its quantized and "
        "float outputs on the calibration samples (at most 64), layer by layer in graph order; pairs' "
        "first nodes get a zero bias to correct (models of at most 32 Conv/Gemm layers: it costs a run "
        f"per layer). Default now: {said(fixed)}. With `--int8-middle int16` "
        f"as well: {said(wide)}, but the pairs then run in float (timing below): an option, not the "
        "default. At this ruined ratio the remaining flipped digits still net more than 0.5 point on "
        "2,000 digits; the tests gate this case on the output error and agreement, and accuracy at "
        "`--target-params 0.7`.",
    ]


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def render(rows: list[dict], ablation: list[dict], timing: str, command: str, seconds: float) -> str:
    lines = [
        "# Deployed precision of the bundled MNIST models (fp32 / fp16 / int8)",
        "",
        f"`{command}` — this project's 2-core CPU container, shared with other jobs; onnxruntime "
        f"{_ort_version()}; {seconds / 60:.1f} min wall. Accuracy: the compressor's own verification on the "
        f"2,000 bundled test digits; int8 calibrated on {SAMPLES} training digits (`--calib mnist`).",
        "",
        "| model | budget | original | fp32 compressed | fp16 | int8 | worst Δ (points) "
        "| weight bytes fp32 → fp16 → int8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sizes = " → ".join(f"{r[p]['weight_bytes']:,}" for p in ("fp32", "fp16", "int8"))
        accuracies = " | ".join(_percent(r[p]["accuracy"]) for p in ("fp32", "fp16", "int8"))
        lines.append(
            f"| {r['model']} | `{r['budget']}` | {_percent(r['original'])} | {accuracies} "
            f"| {r['worst_points']:.2f} | {sizes} |"
        )
    lines += ["", *_summary(rows)]
    if ablation:
        head = ablation[0]
        lines += ["", *_finding(ablation)]
        lines += [
            "",
            f"## int8 settings tried ({head['model']}, `{head['budget']}`)",
            "",
            "Same fp32 factorized model; accuracy, top-1 agreement with it and the relative L2 error of "
            "the logits on the 2,000 test digits, and the norm of its mean over the digits (the constant "
            "part, on the same scale). Rows above the bias correction are onnxruntime's "
            "`quantize_static` with one setting changed from lrdeploy's (QDQ, per-channel symmetric int8 "
            "weights, asymmetric int8 activations, MinMax on 256 training digits).",
            "",
            "| variant | accuracy | agreement | rel L2 (logits) | of which constant |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in ablation:
            scores = f"{_percent(r['accuracy'])} | {_percent(r['agreement'])} | {r['rel_l2']:.4f}"
            scores += f" | {r['offset_l2']:.4f}"
            lines.append(f"| {r['variant']} | {scores} |")
    if timing:
        lines += [
            "",
            "## Speed of the int16 middle tensors (vgg_baseline, `--rank-ratio 0.5`, CPU EP, batch 32)",
            "",
            "fp32 factorized (the baseline row), int8 (lrdeploy's default) and int8 with `middle='int16'`, "
            "interleaved medians, 2 threads, on the shared loaded container (p90 shows the noise; re-measure "
            "on a quiet machine before quoting a ratio):",
            "",
            timing.strip(),
        ]
    return "\n".join(lines) + "\n"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "models" / "RESULTS_precision.md")
    parser.add_argument("--no-ablation", action="store_true", help="only the main table")
    parser.add_argument("--timing", action="store_true", help="time fp32 / int8 / int8 int16-middle")
    parser.add_argument("--runs", type=int, default=20, help="timed rounds for --timing (after 3 warm-up)")
    parser.add_argument("--resnet-overhead", type=Path, metavar="DIR", help="only time the correction")
    args = parser.parse_args()
    if args.resnet_overhead:
        args.resnet_overhead.mkdir(parents=True, exist_ok=True)
        print(json.dumps(resnet_overhead(args.resnet_overhead)))
        return
    flags = [f for f, on in (("--no-ablation", args.no_ablation), ("--timing", args.timing)) if on]
    flags += [f"--runs {args.runs}"] if args.timing and args.runs != 20 else []
    command = " ".join(["python benchmarks/precision_table.py", *flags])
    start = time.perf_counter()
    rows = main_rows()
    with tempfile.TemporaryDirectory(prefix="lrdeploy-precision-") as work:
        ablation = [] if args.no_ablation else ablation_rows(Path(work))
        timing = timing_table(Path(work), runs=args.runs) if args.timing else ""
    text = render(rows, ablation, timing, command, time.perf_counter() - start)
    args.out.with_suffix(".json").write_text(
        json.dumps({"main": rows, "ablation": ablation}, indent=1) + "\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
