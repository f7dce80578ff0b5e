"""The command line: flags become a config, the API does the work, rich renders the result.

Every failure the user can act on is one line on stderr with exit code 2 (usage), 1 (runtime) or 3
(a verification gate failed); set LRDEPLOY_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.exceptions import Abort, Exit, TyperException

from lrdeploy.cli.options import (
    Allocate,
    Atol,
    BatchAxis,
    BatchSize,
    Calib,
    CalibHoldout,
    CalibSamples,
    Cost,
    Data,
    Device,
    Format,
    Groups,
    ImcArray,
    ImcMapping,
    InputShape,
    InputValue,
    Int8Middle,
    LatencyBatch,
    LatencyTable,
    Layout,
    Limit,
    MaxRelL2,
    Mean,
    Method,
    MinCosine,
    MinTop1,
    ModelArg,
    Precision,
    Quantize,
    RandomBatches,
    Resize,
    Rtol,
    Scale,
    Seed,
    Std,
    Target,
    TargetLatency,
    TargetMacs,
    TargetParams,
    Threads,
    output_format,
    parse_ints,
    require_module,
    verify_config,
)
from lrdeploy.errors import LrdeployError, UsageError, VerificationFailed
from lrdeploy.spelling import command_line
from lrdeploy.text import printable
from lrdeploy.trainer.cli import train
from lrdeploy.trainer.finetune_cli import finetune

app = typer.Typer(
    help="Low-rank factorization of ONNX models, verified and benchmarked on ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
#: Width of tables written to a pipe or a log, where nothing wraps them.
PIPED_WIDTH = 200


def _show_version(value: bool) -> None:
    if value:
        from lrdeploy import __version__

        console.out(f"lrdeploy {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Low-rank factorization of ONNX models, verified and benchmarked on ONNX Runtime."""


def _consoles(fmt: str) -> tuple[Console, Console]:
    """Where the result goes, and where remarks go: stderr when stdout carries CSV or JSON."""
    return console, (console if fmt in ("table", "plain") else err_console)


@contextmanager
def _outputs(targets: dict[str, Path | None], models: list[Path]) -> Iterator:
    """Check every output path before any work, stage what the command writes, remove what is left."""
    from lrdeploy.io.outputs import OutputSet, input_files

    with OutputSet(input_files(models)) as outputs:
        for flag, path in targets.items():
            outputs.check(path, flag)
        yield outputs


@contextmanager
def _progress():
    """A transient progress bar on stderr; yields update(stage, done, total)."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield update


@app.command()
def compress(
    model: ModelArg,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Output (default: MODEL.lowrank.onnx).")
    ] = None,
    rank_ratio: Annotated[
        float | None, typer.Option(help="Rank as a fraction of min(m, n), in (0, 1].")
    ] = None,
    energy: Annotated[
        float | None, typer.Option(help="Keep this fraction of Σσ² per layer, in (0, 1].")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="The same rank for every layer.")] = None,
    target_params: TargetParams = None,
    target_macs: TargetMacs = None,
    cost: Cost = None,
    target: Target = None,
    target_latency: TargetLatency = None,
    latency_table: LatencyTable = None,
    latency_batch: LatencyBatch = 1,
    threads: Threads = None,
    precision: Precision = "fp32",
    quantize: Quantize = None,
    int8_middle: Int8Middle = "int8",
    allocate: Allocate = "error",
    method: Method = "auto",
    calib: Calib = None,
    calib_samples: CalibSamples = 256,
    calib_holdout: CalibHoldout = 0.2,
    groups: Groups = 1,
    imc_array: ImcArray = None,
    imc_mapping: ImcMapping = "im2col",
    rank_multiple: Annotated[int, typer.Option(help="Round ranks up to a multiple of this (hardware).")] = 1,
    include: Annotated[
        list[str] | None,
        typer.Option(
            help="Only layers whose node, weight or module-scope name matches this glob (repeatable)."
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            help="Skip layers whose node, weight or module-scope name matches this glob (repeatable)."
        ),
    ] = None,
    overrides: Annotated[
        Path | None, typer.Option(help='JSON {"layer name or glob": rank}; wins over the policy.')
    ] = None,
    fold_bn: Annotated[bool, typer.Option(help="Fold BatchNormalization into its producer first.")] = True,
    verify: Annotated[bool, typer.Option(help="Compare outputs with the original on onnxruntime.")] = True,
    keep_failed: Annotated[bool, typer.Option(help="Write the output even if a gate fails.")] = False,
    requantize: Annotated[
        bool, typer.Option(help="Factorize int8/uint8 weights behind DequantizeLinear; factors re-quantized.")
    ] = False,
    report: Annotated[Path | None, typer.Option(help="Also write the report as JSON here.")] = None,
    input_shape: InputShape = None,
    input_value: InputValue = None,
    batch_axis: BatchAxis = None,
    device: Device = "auto",
    data: Data = None,
    batch_size: BatchSize = 32,
    limit: Limit = None,
    random_batches: RandomBatches = 8,  # lrdeploy.runtime.verification.RANDOM_BATCHES
    seed: Seed = 0,
    resize: Resize = None,
    layout: Layout = None,
    scale: Scale = 1 / 255,
    mean: Mean = "0",
    std: Std = "1",
    atol: Atol = None,
    rtol: Rtol = 0.0,
    max_rel_l2: MaxRelL2 = None,
    min_cosine: MinCosine = None,
    min_top1: MinTop1 = None,
    format_: Format = None,
) -> None:
    """Fold BN, factorize Conv/Gemm/MatMul by truncated SVD, verify, and report."""
    from lrdeploy.api import compress as compress_model
    from lrdeploy.cli.render import render_report, render_verification
    from lrdeploy.cli.tables import print_line
    from lrdeploy.config import CompressConfig, load_overrides, parse_input_shapes
    from lrdeploy.io.modelio import default_output_path

    fmt = output_format(format_, console.is_terminal)

    if calib not in (None, "random", "mnist") and Path(calib).is_dir():
        require_module("PIL", "--calib with an image folder", "images", "Pillow")
    verification = verify_config(
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
        input_value,
        batch_axis,
    )
    config = CompressConfig.build(
        rank_ratio=rank_ratio,
        energy=energy,
        rank=rank,
        rank_multiple=rank_multiple,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        overrides=load_overrides(overrides) if overrides else {},
        fold_bn=fold_bn,
        verify=verify,
        verification=verification,
        keep_failed=keep_failed,
        requantize=requantize,
        input_shapes=parse_input_shapes(input_shape or []),
        target_params=target_params,
        target_macs=target_macs,
        cost=cost,
        target=target,
        target_latency=target_latency,
        latency_table=latency_table,
        latency_batch=latency_batch,
        threads=threads,
        precision=precision,
        quantize=quantize,
        int8_middle=int8_middle,
        allocate=allocate,
        method=method,
        calib=calib,
        calib_samples=calib_samples,
        calib_holdout=calib_holdout,
        groups=groups,
        imc_array=imc_array,
        imc_mapping=imc_mapping,
    )
    output = output or default_output_path(model)
    failure = None
    with _progress() as update:  # the API checks, stages and promotes -o, its .data and --report
        try:
            _, result = compress_model(model, output=output, report=report, config=config, progress=update)
        except VerificationFailed as error:
            failure, result = error, error.report
    out, remarks = _consoles(fmt)
    if fmt == "json":
        out.out(result.to_json().rstrip("\n"), highlight=False)
    else:
        render_report(result, out, fmt)
    if result.output:
        print_line(remarks, f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)", fmt=fmt)
    if result.verification is not None and fmt != "json":
        render_verification(result.verification, remarks, fmt)
    if report is not None:
        print_line(remarks, f"report: {report}", fmt=fmt)
    if failure is not None:
        raise failure


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


@app.command()
def inspect(
    model: ModelArg,
    fold_bn: Annotated[
        bool, typer.Option(help="Fold BatchNormalization first (what compress factorizes).")
    ] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the profile as JSON here.")] = None,
    input_shape: InputShape = None,
    calib: Calib = None,
    calib_samples: CalibSamples = 256,
    format_: Format = None,
) -> None:
    """List factorizable layers, the singular-value energy profile of their weights and their MACs;
    with --calib, each layer's output error on the calibration data for plain SVD and whitened factors."""
    from lrdeploy.cli.render import render_inspection
    from lrdeploy.cli.tables import print_line
    from lrdeploy.config import parse_input_shapes
    from lrdeploy.inspection import inspect as inspect_model

    fmt = output_format(format_, console.is_terminal)
    out, remarks = _consoles(fmt)
    shapes = parse_input_shapes(input_shape or [])
    with _outputs({"--json": json_path}, [model]) as outputs:
        inspection = inspect_model(
            model, fold_bn=fold_bn, input_shapes=shapes, calib=calib, calib_samples=calib_samples
        )
        if json_path is not None:
            outputs.write_text(json_path, inspection.to_json())
        outputs.promote()
    if fmt == "json":
        out.out(inspection.to_json().rstrip("\n"), highlight=False)
    else:
        render_inspection(inspection, out, fmt)
    if json_path is not None:
        print_line(remarks, f"profile: {json_path}", fmt=fmt)


@app.command("verify")
def verify_command(
    original: Annotated[Path, typer.Argument(help="The reference model.", show_default=False)],
    compressed: Annotated[Path, typer.Argument(help="The model to check against it.", show_default=False)],
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result as JSON here.")] = None,
    input_shape: InputShape = None,
    input_value: InputValue = None,
    batch_axis: BatchAxis = None,
    device: Device = "auto",
    data: Data = None,
    batch_size: BatchSize = 32,
    limit: Limit = None,
    random_batches: RandomBatches = 8,  # lrdeploy.runtime.verification.RANDOM_BATCHES
    seed: Seed = 0,
    resize: Resize = None,
    layout: Layout = None,
    scale: Scale = 1 / 255,
    mean: Mean = "0",
    std: Std = "1",
    atol: Atol = None,
    rtol: Rtol = 0.0,
    max_rel_l2: MaxRelL2 = None,
    min_cosine: MinCosine = None,
    min_top1: MinTop1 = None,
    format_: Format = None,
) -> None:
    """Compare two models' outputs on the same inputs; exit 3 when a gate fails."""
    from lrdeploy.cli.render import render_verification_table
    from lrdeploy.cli.tables import print_line
    from lrdeploy.config import parse_input_shapes
    from lrdeploy.report import strict_json
    from lrdeploy.runtime.verification import verify

    fmt = output_format(format_, console.is_terminal)
    config = verify_config(
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
        input_value,
        batch_axis,
    )
    with _outputs({"--json": json_path}, [original, compressed]) as outputs, _progress() as update:
        result = verify(
            original,
            compressed,
            input_shapes=parse_input_shapes(input_shape or []),
            config=config,
            progress=lambda done, total: update("verify", done, total),
        )
        document = strict_json(result.to_dict() | {"gate_failures": config.gates.failures(result)})
        if json_path is not None:  # written when a gate fails too: it is the verdict
            outputs.write_text(json_path, document)
        outputs.promote()
    out, remarks = _consoles(fmt)
    if fmt == "json":
        out.out(document.rstrip("\n"), highlight=False)
    else:
        render_verification_table(result, out, fmt)
    if json_path is not None:
        print_line(remarks, f"result: {json_path}", fmt=fmt)
    if not config.gates.active:
        line = "no gates set (--atol, --max-rel-l2, --min-cosine, --min-top1): nothing to fail"
        print_line(remarks, line, fmt=fmt)
    config.gates.check(result)


@app.command()
def bench(
    models: Annotated[
        list[Path], typer.Argument(help="Models to time; the first is the baseline.", show_default=False)
    ],
    device: Device = "auto",
    batch: Annotated[str, typer.Option(help="Batch sizes, e.g. 1,8,32.")] = "1",
    runs: Annotated[int, typer.Option(help="Timed rounds (each runs every model once).")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first.")] = 10,
    threads: Annotated[
        int | None, typer.Option(help="CPU intra-op threads (default: onnxruntime's).")
    ] = None,
    input_shape: InputShape = None,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    tf32: Annotated[bool, typer.Option(help="CUDA: allow TF32 math (onnxruntime's default).")] = True,
    cuda_graph: Annotated[bool, typer.Option(help="CUDA: replay each run as one CUDA graph.")] = False,
    prefer_nhwc: Annotated[bool, typer.Option(help="CUDA: NHWC convolution kernels.")] = False,
    cudnn_conv_algo_search: Annotated[
        str, typer.Option(help="CUDA: EXHAUSTIVE (onnxruntime's default) or HEURISTIC.")
    ] = "EXHAUSTIVE",
    cudnn_conv_use_max_workspace: Annotated[
        bool, typer.Option(help="CUDA: let cuDNN use its largest workspace.")
    ] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every timing as JSON here.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw latency vs batch size to this PNG (matplotlib).")
    ] = None,
    format_: Format = None,
) -> None:
    """Median latency of models side by side (interleaved), with speedup and efficiency."""
    from lrdeploy.cli.render import plot_bench, render_bench
    from lrdeploy.cli.tables import print_line
    from lrdeploy.config import parse_input_shapes
    from lrdeploy.report import strict_json
    from lrdeploy.runtime.bench import BenchConfig, benchmark

    fmt = output_format(format_, console.is_terminal)
    config = BenchConfig(
        device=device,
        batch_sizes=parse_ints(batch, "--batch"),
        warmup=warmup,
        runs=runs,
        threads=threads,
        input_shapes=parse_input_shapes(input_shape or []),
        seed=seed,
        tf32=tf32,
        cuda_graph=cuda_graph,
        prefer_nhwc=prefer_nhwc,
        cudnn_conv_algo_search=cudnn_conv_algo_search,
        cudnn_conv_use_max_workspace=cudnn_conv_use_max_workspace,
    )
    if len({m.resolve() for m in models}) != len(models):
        raise UsageError("a model is given twice; give each model once (copy the file to time it twice)")
    if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {plot}: give a file name ending in one of {', '.join(PLOT_SUFFIXES)}")
    if plot is not None:
        require_module("matplotlib", "--plot", "plot")
    with _outputs({"--json": json_path, "--plot": plot}, models) as outputs, _progress() as update:
        result = benchmark([str(m) for m in models], config, lambda done, total: update("bench", done, total))
        if json_path is not None:
            outputs.write_text(json_path, strict_json(result.to_dict()))
        if plot is not None:
            plot_bench(result, outputs.stage(plot))
        outputs.promote()
    out, remarks = _consoles(fmt)
    if fmt == "json":
        out.out(strict_json(result.to_dict()).rstrip("\n"), highlight=False)
    else:
        render_bench(result, out, fmt)
    for flag, path in (("timings", json_path), ("plot", plot)):
        if path is not None:
            print_line(remarks, f"{flag}: {path}", fmt=fmt)


@app.command()
def env(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Versions, execution providers and whether CUDA really starts: paste this into a bug report."""
    from lrdeploy.runtime.envinfo import collect

    info = collect()
    if json_output:
        console.print_json(json.dumps(info))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v)
        elif isinstance(value, list):
            value = ", ".join(value) or "none"
        console.print(f"[bold]{key}[/]: {escape(str(value))}", highlight=False)


@app.command("imc")
def imc_command(
    models: Annotated[
        list[Path], typer.Argument(help="MODEL, and optionally its COMPRESSED version.", show_default=False)
    ],
    array: Annotated[str, typer.Option(help="Crossbar size ROWSxCOLS.")] = "256x256",
    mapping: Annotated[str, typer.Option(help="im2col, sdk, vwsdk or all (comma-separated).")] = "all",
    input_shape: InputShape = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw cycles per layer to this PNG (matplotlib).")] = None,
    simulate: Annotated[bool, typer.Option(help="Run the models on simulated noisy crossbars.")] = False,
    data: Data = None,
    weight_noise: Annotated[float, typer.Option(help="Programming noise σ ÷ column max |w|.")] = 0.02,
    dac_bits: Annotated[int, typer.Option(help="Input DAC resolution (bits, 0: ideal).")] = 8,
    adc_bits: Annotated[int, typer.Option(help="Per-tile ADC resolution (bits, 0: ideal).")] = 8,
    output_noise: Annotated[float, typer.Option(help="Output noise σ ÷ ADC range.")] = 0.0,
    adc_bound: Annotated[
        float | None,
        typer.Option(
            help="ADC full scale = this × input range × tile max |w| (default: calibrated per tile)."
        ),
    ] = None,
    runs: Annotated[int, typer.Option(help="Monte Carlo runs (noise draws).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the first run.")] = 0,
    batch_size: BatchSize = 32,
    limit: Limit = None,
    scale: Scale = 1 / 255,
    mean: Mean = "0",
    std: Std = "1",
    format_: Format = None,
) -> None:
    """Crossbar arrays, utilization and cycles (im2col, SDK, VW-SDK) per layer; --simulate analog noise."""
    from lrdeploy.cli.render_imc import plot_imc, render_imc
    from lrdeploy.cli.tables import print_line
    from lrdeploy.config import parse_input_shapes
    from lrdeploy.imc import map_model, parse_array
    from lrdeploy.imc.report import parse_mappings

    fmt = output_format(format_, console.is_terminal)
    if len(models) > 2:
        raise UsageError(f"imc takes MODEL [COMPRESSED], got {len(models)} models")
    if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {plot}: give a file name ending in one of {', '.join(PLOT_SUFFIXES)}")
    if plot is not None:
        require_module("matplotlib", "--plot", "plot")
    shapes = parse_input_shapes(input_shape or [])
    size, mappings = parse_array(array), parse_mappings(mapping.split(","))
    settings = None
    if simulate:
        from lrdeploy.imc.simulate import NoiseSettings, image_options

        settings = NoiseSettings(weight_noise, dac_bits, adc_bits, output_noise, runs, seed, adc_bound)
        image = image_options(scale, mean, std)
    elif data is not None:
        raise UsageError("--data is read by --simulate; add --simulate or drop --data")
    with _outputs({"--json": json_path, "--plot": plot}, models) as outputs, _progress() as update:
        report = map_model(*models, array=size, mappings=mappings, input_shapes=shapes)
        if settings is not None:
            from lrdeploy.imc.simulate import simulate_models

            progress = lambda done, total: update("simulate", done, total)  # noqa: E731
            report.simulation = simulate_models(
                models, report.array, settings, data, shapes, batch_size, limit, image, progress
            )
        if json_path is not None:
            outputs.write_text(json_path, report.to_json())
        if plot is not None:
            plot_imc(report, outputs.stage(plot))
        outputs.promote()
    out, remarks = _consoles(fmt)
    if fmt == "json":
        out.out(report.to_json().rstrip("\n"), highlight=False)
    else:
        render_imc(report, out, fmt)
    for flag, path in (("report", json_path), ("plot", plot)):
        if path is not None:
            print_line(remarks, f"{flag}: {path}", fmt=fmt)


# `lrdeploy train` (the [train] extra): its module imports typer only; torch loads when the command runs.
app.command(help="Train a low-rank-friendly model (LRPET, LoRITa or baseline) and export ONNX.")(train)
app.command(help="Fine-tune a compressed model by distillation from its original; same graph.")(finetune)


def _fail(message: str, code: int) -> int:
    text = escape(printable(message.strip(), limit=2000))
    err_console.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
    return code


def _fixed_mmap_threshold() -> None:
    """Let freed weight-sized buffers go back to the OS (glibc only).

    glibc raises its mmap threshold each time a large block is freed, after which multi-megabyte weight
    copies come from the heap and stay in the process after they are freed; on a ResNet-50 that is
    ~60 MiB of peak memory. Fixing the threshold at its default keeps large buffers mmap-backed.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


@command_line
def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors instead of tracebacks; returns the exit code."""
    _fixed_mmap_threshold()
    if not console.is_terminal:  # rich assumes 80 columns when piped, and truncates table cells
        # Every call: rich fixes the width from COLUMNS at import, and main may run again in one process.
        columns = os.environ.get("COLUMNS", "")
        console.width = int(columns) if columns.isdecimal() and int(columns) > 0 else PIPED_WIDTH
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="lrdeploy", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except Exit as done:
        return done.exit_code
    except Abort:
        return _fail("aborted", 130)
    except TyperException as error:  # click's usage errors (typer vendors click)
        if not error.format_message():  # no arguments at all: click has printed the help
            return getattr(error, "exit_code", 2)
        ctx = getattr(error, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        return _fail(f"{error.format_message()}{hint}", getattr(error, "exit_code", 2))
    except LrdeployError as error:
        if os.environ.get("LRDEPLOY_DEBUG"):
            raise
        return _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as error:  # a bug: still one line, with a way to see more
        if os.environ.get("LRDEPLOY_DEBUG"):
            raise
        return _fail(
            f"internal error: {type(error).__name__}: {error} (LRDEPLOY_DEBUG=1 shows the traceback)", 1
        )


def run() -> None:
    sys.exit(main())


__all__ = ["app", "main", "run"]
