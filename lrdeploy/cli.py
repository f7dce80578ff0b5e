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
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.exceptions import Abort, Exit, TyperException

from lrdeploy.cli_options import (
    Atol,
    BatchSize,
    Data,
    Device,
    InputShape,
    Layout,
    Limit,
    MaxRelL2,
    Mean,
    MinCosine,
    MinTop1,
    ModelArg,
    RandomBatches,
    Resize,
    Rtol,
    Scale,
    Seed,
    Std,
    parse_ints,
    verify_config,
)
from lrdeploy.errors import LrdeployError, UsageError, VerificationFailed
from lrdeploy.trainer.cli import train

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
    rank_multiple: Annotated[int, typer.Option(help="Round ranks up to a multiple of this (hardware).")] = 1,
    include: Annotated[
        list[str] | None, typer.Option(help="Only nodes matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Skip nodes matching this glob (repeatable).")
    ] = None,
    overrides: Annotated[
        Path | None, typer.Option(help='JSON {"node name": rank}; wins over the policy.')
    ] = None,
    fold_bn: Annotated[bool, typer.Option(help="Fold BatchNormalization into its producer first.")] = True,
    verify: Annotated[bool, typer.Option(help="Compare outputs with the original on onnxruntime.")] = True,
    keep_failed: Annotated[bool, typer.Option(help="Write the output even if a gate fails.")] = False,
    report: Annotated[Path | None, typer.Option(help="Also write the report as JSON here.")] = None,
    input_shape: InputShape = None,
    device: Device = "auto",
    data: Data = None,
    batch_size: BatchSize = 32,
    limit: Limit = None,
    random_batches: RandomBatches = 1,
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
) -> None:
    """Fold BN, factorize Conv/Gemm/MatMul by truncated SVD, verify, and report."""
    from lrdeploy.api import compress as compress_model
    from lrdeploy.config import CompressConfig, load_overrides, parse_input_shapes
    from lrdeploy.modelio import default_output_path, write_text_atomic
    from lrdeploy.render import render_report, render_verification

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
        input_shapes=parse_input_shapes(input_shape or []),
    )
    output = output or default_output_path(model)
    _check_outputs({"-o": output, "--report": report}, [model])
    failure = None
    with _progress() as update:
        try:
            _, result = compress_model(model, output=output, config=config, progress=update)
        except VerificationFailed as error:
            failure, result = error, error.report
    render_report(result, console)
    if result.output:
        console.print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    if result.verification is not None:
        render_verification(result.verification, console)
    if report is not None:
        write_text_atomic(report, result.to_json())
        console.print(f"report: {report}")
    if failure is not None:
        raise failure


PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _check_outputs(outputs: dict[str, Path | None], inputs: list[Path]) -> None:
    """Before any work: every output path is writable, replaces no input, and no two outputs coincide."""
    from lrdeploy.modelio import check_output_target

    taken = list(inputs)
    for flag, path in outputs.items():
        if path is not None:
            check_output_target(path, flag, taken)
            taken.append(path)


@app.command()
def inspect(
    model: ModelArg,
    fold_bn: Annotated[
        bool, typer.Option(help="Fold BatchNormalization first (what compress factorizes).")
    ] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the profile as JSON here.")] = None,
    input_shape: InputShape = None,
) -> None:
    """List factorizable layers, the singular-value energy profile of their weights and their MACs."""
    from lrdeploy.config import parse_input_shapes
    from lrdeploy.inspection import inspect as inspect_model
    from lrdeploy.modelio import write_text_atomic
    from lrdeploy.render import render_inspection

    _check_outputs({"--json": json_path}, [model])
    inspection = inspect_model(model, fold_bn=fold_bn, input_shapes=parse_input_shapes(input_shape or []))
    render_inspection(inspection, console)
    if json_path is not None:
        write_text_atomic(json_path, inspection.to_json())
        console.print(f"profile: {json_path}")


@app.command("verify")
def verify_command(
    original: Annotated[Path, typer.Argument(help="The reference model.", show_default=False)],
    compressed: Annotated[Path, typer.Argument(help="The model to check against it.", show_default=False)],
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result as JSON here.")] = None,
    input_shape: InputShape = None,
    device: Device = "auto",
    data: Data = None,
    batch_size: BatchSize = 32,
    limit: Limit = None,
    random_batches: RandomBatches = 1,
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
) -> None:
    """Compare two models' outputs on the same inputs; exit 3 when a gate fails."""
    from lrdeploy.config import parse_input_shapes
    from lrdeploy.modelio import write_text_atomic
    from lrdeploy.render import render_verification_table
    from lrdeploy.report import strict_json
    from lrdeploy.verification import verify

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
    )
    _check_outputs({"--json": json_path}, [original, compressed])
    with _progress() as update:
        result = verify(
            original,
            compressed,
            input_shapes=parse_input_shapes(input_shape or []),
            config=config,
            progress=lambda done, total: update("verify", done, total),
        )
    render_verification_table(result, console)
    if json_path is not None:
        failures = config.gates.failures(result)
        write_text_atomic(json_path, strict_json(result.to_dict() | {"gate_failures": failures}))
        console.print(f"result: {json_path}")
    if not config.gates.active:
        console.print("no gates set (--atol, --max-rel-l2, --min-cosine, --min-top1): nothing to fail")
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
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every timing as JSON here.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw latency vs batch size to this PNG (matplotlib).")
    ] = None,
) -> None:
    """Median latency of models side by side (interleaved), with speedup and efficiency."""
    from lrdeploy.bench import BenchConfig, benchmark
    from lrdeploy.config import parse_input_shapes
    from lrdeploy.modelio import write_text_atomic
    from lrdeploy.render import plot_bench, render_bench
    from lrdeploy.report import strict_json

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
    )
    if len({m.resolve() for m in models}) != len(models):
        raise UsageError("a model is given twice; give each model once (copy the file to time it twice)")
    _check_outputs({"--json": json_path, "--plot": plot}, models)
    if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {plot}: give a file name ending in one of {', '.join(PLOT_SUFFIXES)}")
    with _progress() as update:
        result = benchmark([str(m) for m in models], config, lambda done, total: update("bench", done, total))
    render_bench(result, console)
    if json_path is not None:
        write_text_atomic(json_path, strict_json(result.to_dict()))
        console.print(f"timings: {json_path}")
    if plot is not None:
        plot_bench(result, plot)
        console.print(f"plot: {plot}")


@app.command()
def env(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Versions, execution providers and whether CUDA really starts: paste this into a bug report."""
    from lrdeploy.envinfo import collect

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


# `lrdeploy train` (the [train] extra): its module imports typer only; torch loads when the command runs.
app.command(help="Train a low-rank-friendly model (LRPET, LoRITa or baseline) and export ONNX.")(train)


def _fail(message: str, code: int) -> int:
    err_console.print(f"[bold red]error:[/] {escape(message.strip())}", highlight=False, soft_wrap=True)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors instead of tracebacks; returns the exit code."""
    _fixed_mmap_threshold()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH  # rich assumes 80 columns when piped, and truncates table cells
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
