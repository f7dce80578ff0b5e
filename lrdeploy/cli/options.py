"""Command-line options shared by several commands, and the parsing of their comma-separated values.

`compress` and `verify` take the same verification options, so a gate or a data flag means the same in
both; they are declared once here and listed in both signatures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lrdeploy.errors import UsageError

__all__ = [
    "Allocate",
    "Atol",
    "BatchAxis",
    "BatchSize",
    "Calib",
    "CalibHoldout",
    "CalibSamples",
    "Cost",
    "Data",
    "Device",
    "Format",
    "Groups",
    "ImcArray",
    "ImcMapping",
    "InputShape",
    "InputValue",
    "Int8Middle",
    "LatencyBatch",
    "LatencyTable",
    "Layout",
    "Limit",
    "MaxRelL2",
    "Mean",
    "Method",
    "MinCosine",
    "MinTop1",
    "ModelArg",
    "Precision",
    "Quantize",
    "RandomBatches",
    "Resize",
    "Rtol",
    "Scale",
    "Seed",
    "Std",
    "Target",
    "TargetLatency",
    "TargetMacs",
    "TargetParams",
    "Threads",
    "output_format",
    "parse_ints",
    "require_module",
    "verify_config",
]

ModelArg = Annotated[Path, typer.Argument(help="Input .onnx model (never modified).", show_default=False)]
VERIFY = "verification"
GATES = "gates"
BUDGET = "budget and calibration"

Device = Annotated[
    str, typer.Option(help="auto (CUDA EP when it really starts), cpu, cuda or tensorrt (strict).")
]
Data = Annotated[
    str | None,
    typer.Option(
        help="random (default), mnist, FILE.npz (keyed by input), FILE.npy, or an image folder.",
        rich_help_panel=VERIFY,
    ),
]
TargetParams = Annotated[
    float | None,
    typer.Option(
        help="Whole-model budget: this fraction of the parameters, in (0, 1].", rich_help_panel=BUDGET
    ),
]
TargetMacs = Annotated[
    float | None,
    typer.Option(help="Whole-model budget: this fraction of the MACs, in (0, 1].", rich_help_panel=BUDGET),
]
Cost = Annotated[
    str | None,
    typer.Option(
        help="What --target counts: params, macs, or a registered cost (latency, IMC arrays/cycles).",
        rich_help_panel=BUDGET,
    ),
]
Target = Annotated[
    float | None,
    typer.Option(
        help="Whole-model budget in --cost units: this fraction of the original.", rich_help_panel=BUDGET
    ),
]
Groups = Annotated[
    int,
    typer.Option(
        help="Group low rank: factorize each Conv per G groups of input channels (grouped k×k + 1×1 Conv).",
        rich_help_panel=BUDGET,
    ),
]
ImcArray = Annotated[
    str | None,
    typer.Option(
        help="Crossbar size RxC: for --cost imc-arrays/imc-cycles; adds the IMC mapping table to the report.",
        rich_help_panel=BUDGET,
    ),
]
ImcMapping = Annotated[
    str,
    typer.Option(help="Mapping counted by --cost imc-cycles: im2col, sdk or vwsdk.", rich_help_panel=BUDGET),
]
TargetLatency = Annotated[
    float | None,
    typer.Option(
        help="Whole-model budget: this fraction of the dense model's latency measured on --device "
        "(= --cost latency --target F).",
        rich_help_panel=BUDGET,
    ),
]
LatencyTable = Annotated[
    Path | None,
    typer.Option(
        help="Latency table JSON: read it (measured on the target) or write it here (default: a cache).",
        rich_help_panel=BUDGET,
    ),
]
LatencyBatch = Annotated[
    int, typer.Option("--batch", help="Batch size latency is measured at.", rich_help_panel=BUDGET)
]
Threads = Annotated[
    int | None,
    typer.Option(help="CPU intra-op threads for latency (default: onnxruntime's).", rich_help_panel=BUDGET),
]
Precision = Annotated[
    str, typer.Option(help="Deployed precision: fp32 or fp16 (onnxruntime's converter, float32 I/O).")
]
Quantize = Annotated[
    str | None, typer.Option(help="int8: static QDQ, per-channel weights, calibrated on --calib.")
]
Int8Middle = Annotated[
    str,
    typer.Option(
        help="With --quantize int8: each pair's rank-r middle tensor in int8 (default) or int16 "
        "(closer to float, but the pairs then run in float: slower on the CPU EP)."
    ),
]
Allocate = Annotated[
    str,
    typer.Option(
        help="Budget allocation: error (each layer's truncation error) or sensitivity (measured end to end).",
        rich_help_panel=BUDGET,
    ),
]
Method = Annotated[
    str,
    typer.Option(
        help="Factors: svd, whiten (data-aware), or auto (whiten with --calib).", rich_help_panel=BUDGET
    ),
]
Calib = Annotated[
    str | None,
    typer.Option(
        help="Calibration data: mnist (training digits), FILE.npz, FILE.npy or an image folder.",
        rich_help_panel=BUDGET,
    ),
]
CalibSamples = Annotated[
    int, typer.Option(help="Calibration samples to read at most.", rich_help_panel=BUDGET)
]
CalibHoldout = Annotated[
    float,
    typer.Option(help="Share of the calibration samples held apart from fitting.", rich_help_panel=BUDGET),
]
Format = Annotated[
    str | None,
    typer.Option(
        "--format", help="table, plain, csv or json (default: table on a terminal, plain in a pipe)."
    ),
]
InputShape = Annotated[
    list[str] | None, typer.Option(help="NAME:d0,d1,... for symbolic input dims (repeatable).")
]
InputValue = Annotated[
    list[str] | None,
    typer.Option(
        help="NAME=VALUE: feed this constant to an input random data cannot choose (a sample rate), "
        "also where a data file lacks it (repeatable).",
        rich_help_panel=VERIFY,
    ),
]
BatchAxis = Annotated[
    list[str] | None,
    typer.Option(
        help="NAME:AXIS: the axis of a data file's array that holds the samples (default: the model's "
        "batch dim; repeatable).",
        rich_help_panel=VERIFY,
    ),
]
BatchSize = Annotated[int, typer.Option(help="Samples per batch for real data.", rich_help_panel=VERIFY)]
Limit = Annotated[int | None, typer.Option(help="Use at most this many samples.", rich_help_panel=VERIFY)]
RandomBatches = Annotated[
    int, typer.Option(help="Random batches to draw (samples = batches × batch size).", rich_help_panel=VERIFY)
]
Seed = Annotated[int, typer.Option(help="Seed of the random inputs.", rich_help_panel=VERIFY)]
Resize = Annotated[
    str | None, typer.Option(help="Images: H,W (default: the model's).", rich_help_panel=VERIFY)
]
Layout = Annotated[
    str | None, typer.Option(help="Images: NCHW or NHWC (default: guessed).", rich_help_panel=VERIFY)
]
Scale = Annotated[
    float, typer.Option(help="Images/MNIST: pixel multiplier.", show_default="1/255", rich_help_panel=VERIFY)
]
Mean = Annotated[
    str, typer.Option(help="Images/MNIST: per-channel mean, e.g. 0.485,0.456,0.406.", rich_help_panel=VERIFY)
]
Std = Annotated[str, typer.Option(help="Images/MNIST: per-channel std.", rich_help_panel=VERIFY)]
Atol = Annotated[
    float | None, typer.Option(help="Gate: |a−b| ≤ atol + rtol·|a| everywhere.", rich_help_panel=GATES)
]
Rtol = Annotated[float, typer.Option(help="Relative part of the --atol gate.", rich_help_panel=GATES)]
MaxRelL2 = Annotated[
    float | None, typer.Option(help="Gate: relative L2 error at most this.", rich_help_panel=GATES)
]
MinCosine = Annotated[
    float | None, typer.Option(help="Gate: cosine similarity at least this.", rich_help_panel=GATES)
]
MinTop1 = Annotated[
    float | None, typer.Option(help="Gate: top-1 agreement at least this.", rich_help_panel=GATES)
]


def output_format(value: str | None, terminal: bool) -> str:
    from lrdeploy.cli.tables import FORMATS

    if value is None:
        return "table" if terminal else "plain"
    if value.lower() not in FORMATS:
        raise UsageError(f"--format expects one of {', '.join(FORMATS)}, got '{value}'")
    return value.lower()


def require_module(module: str, flag: str, extra: str, package: str | None = None) -> None:
    """Fail before any work when ``flag`` needs an optional dependency that is not installed."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{flag} needs {package or module}: pip install 'lrdeploy[{extra}]'") from None


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} expects comma-separated numbers, got '{text}'") from None


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{flag} expects comma-separated positive integers, got '{text}'")
    return values


def verify_config(
    device,
    data,
    batch_size,
    limit,
    random_batches,
    seed,
    resize,
    layout,
    scale,
    mean,
    std,
    atol,
    rtol,
    max_rel_l2,
    min_cosine,
    min_top1,
    input_value=None,
    batch_axis=None,
):
    from lrdeploy.runtime.datasets import ImageOptions
    from lrdeploy.runtime.feeding import parse_batch_axes, parse_input_values
    from lrdeploy.runtime.verification import VerifyConfig
    from lrdeploy.runtime.verify import Gates

    if data not in (None, "random", "mnist") and Path(data).is_dir():
        require_module("PIL", "--data with an image folder", "images", "Pillow")
    size = parse_ints(resize, "--resize") if resize else None
    if size is not None and len(size) != 2:
        raise UsageError(f"--resize expects H,W, got '{resize}'")
    image = ImageOptions(
        size,
        layout.upper() if layout else None,
        scale,
        parse_floats(mean, "--mean"),
        parse_floats(std, "--std"),
    )
    gates = Gates(atol, rtol, max_rel_l2, min_cosine, min_top1)
    config = VerifyConfig(device, data, image, batch_size, limit, random_batches, seed, gates)
    return config.with_(
        input_values=parse_input_values(input_value or []), batch_axes=parse_batch_axes(batch_axis or [])
    )
