"""Rich tables for the terminal: the compression report and the inspect profile."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lrdeploy.bench import BenchResult
from lrdeploy.errors import UsageError
from lrdeploy.report import Report
from lrdeploy.units import format_count
from lrdeploy.verify import Verification

__all__ = [
    "plot_bench",
    "render_bench",
    "render_inspection",
    "render_report",
    "render_verification",
    "render_verification_table",
]


def _ratio(before: int | None, after: int | None) -> str:
    if not before or after is None:
        return ""
    return f" (÷{before / after:.2f})" if after else ""


def _shape(shape) -> str:
    return "×".join(str(d) for d in shape) if shape else "-"


def render_report(report: Report, console: Console) -> None:
    table = Table(title="lrdeploy compress", title_justify="left", header_style="bold")
    for column in ("layer", "op", "weight", "rank", "energy", "params", "MACs", "status"):
        table.add_column(
            column, justify="right" if column in ("rank", "energy", "params", "MACs") else "left"
        )
    for layer in report.layers:
        d = layer.decision
        rank = f"{d.rank}/{d.full_rank}" if d.rank else (f"-/{d.full_rank}" if d.full_rank else "-")
        energy = f"{100 * d.energy_kept:.1f}%" if d.energy_kept is not None else "-"
        params = f"{format_count(layer.params_before)}→{format_count(layer.params_after)}" if d.m else "-"
        macs = f"{format_count(layer.macs_before)}→{format_count(layer.macs_after)}"
        status = (
            "[green]factorized[/]" if d.status == "factorized" else f"[yellow]skipped[/]: {escape(d.reason)}"
        )
        table.add_row(escape(d.name), d.op, _shape(d.weight_shape), rank, energy, params, macs, status)
    table.add_section()
    table.add_row(
        "total",
        "",
        "",
        f"{len(report.factorized)}/{len(report.layers)}",
        "",
        f"{format_count(report.params_before)}→{format_count(report.params_after)}",
        f"{format_count(report.macs_before)}→{format_count(report.macs_after)}",
        "",
    )
    console.print(table)
    folded = [b for b in report.batchnorm if b["status"] == "folded"]
    kept = [b for b in report.batchnorm if b["status"] != "folded"]
    if report.batchnorm:
        console.print(f"BatchNormalization: {len(folded)} folded, {len(kept)} kept")
        for bn in kept:
            console.print(f"  kept [bold]{escape(bn['name'])}[/]: {escape(bn['reason'])}")
    console.print(
        f"params {format_count(report.params_before)} → {format_count(report.params_after)}"
        f"{_ratio(report.params_before, report.params_after)}, "
        f"MACs {format_count(report.macs_before)} → {format_count(report.macs_after)}"
        f"{_ratio(report.macs_before, report.macs_after)} at {escape(str(report.input_shapes))}"
    )
    for note in report.notes:
        console.print(escape(note))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def render_verification(verification: Verification, console: Console) -> None:
    """One line: where it ran, on what, and the worst numbers over the outputs."""
    if verification.note:
        console.print(f"[yellow]{escape(verification.note)}[/]")
    parts = [f"max |Δ| {verification.max_abs_diff:.3g}"]
    if verification.rel_l2 is not None:
        parts += [f"rel L2 {verification.rel_l2:.3g}", f"cosine {verification.cosine:.6f}"]
    matches = [o.exact_match for o in verification.outputs if o.exact_match is not None]
    if matches:
        parts.append(f"ids/masks equal {_percent(min(matches))}")
    if verification.top1_agreement is not None:
        parts.append(f"top-1 agreement {_percent(verification.top1_agreement)}")
    scored = verification.scored
    if scored is not None:
        parts.append(
            f"accuracy {_percent(scored.accuracy_original)} → {_percent(scored.accuracy_compressed)}"
        )
    where = f"verified on {verification.provider} with {escape(verification.data)}"
    console.print(
        f"{where}, {verification.samples} sample(s): " + ", ".join(parts),
        highlight=False,
    )


def render_verification_table(verification: Verification, console: Console) -> None:
    table = Table(
        title=f"lrdeploy verify ({verification.provider}, {escape(verification.data)})", title_justify="left"
    )
    columns = (
        "output",
        "shape",
        "max |Δ|",
        "rel L2",
        "cosine",
        "equal",
        "top-1",
        "top-5",
        "acc orig",
        "acc new",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "output" else "right", overflow="fold")
    for out in verification.outputs:
        table.add_row(
            escape(out.name),
            _shape(out.shape),
            f"{out.max_abs_diff:.3g}",
            "-" if out.rel_l2 is None else f"{out.rel_l2:.3g}",
            "-" if out.cosine is None else f"{out.cosine:.6f}",
            _percent(out.exact_match),
            _percent(out.top1_agreement),
            _percent(out.top5_agreement),
            _percent(out.accuracy_original),
            _percent(out.accuracy_compressed),
        )
    console.print(table)
    if verification.note:
        console.print(f"[yellow]{escape(verification.note)}[/]")
    console.print(f"{verification.samples} sample(s)")


def render_bench(result: BenchResult, console: Console) -> None:
    config = result.config
    threads = f", {config.threads} threads" if config.threads else ""
    title = f"lrdeploy bench ({result.provider}{threads}; median of {config.runs} interleaved rounds)"
    table = Table(title=title, title_justify="left", header_style="bold")
    columns = (
        "model",
        "batch",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "mean ms",
        "items/s",
        "MACs",
        "speedup",
        "MAC ÷",
        "efficiency",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for timing in result.timings:
        speedup, reduction, efficiency = (
            result.speedup(timing),
            result.mac_reduction(timing),
            result.efficiency(timing),
        )
        table.add_row(
            escape(timing.model),
            str(timing.batch),
            f"{timing.p50:.3f}",
            f"{timing.percentile(90):.3f}",
            f"{timing.percentile(99):.3f}",
            f"{timing.mean:.3f}",
            f"{timing.throughput:.1f}",
            format_count(timing.macs),
            f"{speedup:.2f}×" if speedup else "-",
            f"{reduction:.2f}×" if reduction else "-",
            f"{efficiency:.2f}" if efficiency else "-",
        )
    console.print(table)
    if result.note:
        console.print(f"[yellow]{escape(result.note)}[/]")
    for skipped in result.skipped:
        console.print(f"skipped {escape(skipped)}")


def plot_bench(result: BenchResult, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'lrdeploy[plot]'") from None
    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for model in result.models:
        points = sorted((t.batch, t.p50) for t in result.timings if t.model == model)
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=Path(model).name)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("batch size")
    axis.set_ylabel("median latency (ms)")
    axis.set_title(f"onnxruntime {result.provider}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def render_inspection(inspection, console: Console) -> None:
    table = Table(title="factorizable layers (BN folded)", title_justify="left", header_style="bold")
    columns = (
        "layer",
        "op",
        "weight",
        "m×n",
        "full",
        "E@10%",
        "E@25%",
        "E@50%",
        "r@90%",
        "r@99%",
        "break-even",
        "MACs",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "op", "weight") else "right")
    for layer in inspection.layers:
        name = escape(layer.names[0]) + (f" (+{len(layer.names) - 1} shared)" if len(layer.names) > 1 else "")
        table.add_row(
            name,
            layer.op,
            _shape(layer.weight_shape),
            f"{layer.m}×{layer.n}",
            str(layer.full_rank),
            *(f"{100 * layer.energy_at(r):.1f}%" for r in (0.1, 0.25, 0.5)),
            *(str(layer.rank_for(e)) for e in (0.9, 0.99)),
            str(layer.break_even_rank()),
            format_count(layer.macs),
        )
    console.print(table)
    console.print(
        "E@x: fraction of Σσ² kept at rank ratio x; r@e: smallest rank keeping energy e; "
        "break-even: largest rank that still saves parameters; "
        f"MACs at {escape(str(inspection.input_shapes))} (model total {format_count(inspection.total_macs)})"
    )
    for decision in inspection.skipped:
        macs = inspection.macs.get(decision.name)
        cost = f", {format_count(macs)} MACs" if decision.name in inspection.macs else ""
        name, reason = escape(decision.name), escape(decision.reason)
        console.print(f"  not factorizable [bold]{name}[/] ({decision.op}{cost}): {reason}")
    folded = sum(1 for b in inspection.batchnorm if b["status"] == "folded")
    if inspection.batchnorm:
        console.print(f"BatchNormalization: {folded} foldable, {len(inspection.batchnorm) - folded} not")
