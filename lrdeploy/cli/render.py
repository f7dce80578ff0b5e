"""What the commands print: the compression report, the inspect profile, verification and bench results.

Each result becomes a `lrdeploy.cli.tables.Sheet` printed in the chosen format (``table``, ``plain``,
``csv``); model strings are escaped on the way (`lrdeploy.text`). Noise is summarized rather than listed:
MatMuls of two activations (attention scores) have no weight and become one line, and nodes sharing a
factorized weight point to the row that carries the saving.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from lrdeploy.cli.tables import Column, Sheet, print_line, print_sheet
from lrdeploy.errors import UsageError
from lrdeploy.report import Report
from lrdeploy.runtime.bench import BenchResult
from lrdeploy.runtime.verify import Verification
from lrdeploy.units import format_count

__all__ = [
    "format_shapes",
    "is_dynamic",
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


def format_shapes(shapes: Mapping[str, Sequence[int] | None]) -> str:
    """``input 1×3×64×64, mask 1×128``: the input shapes the counts were made at."""
    return ", ".join(f"{name} {_shape(shape) if shape else '(unknown)'}" for name, shape in shapes.items())


def is_dynamic(decision) -> bool:
    """A node whose 'weight' is another activation (attention's Q·Kᵀ, attn·V): nothing to factorize."""
    return bool(getattr(decision, "dynamic", False))


def _dynamic_summary(decisions: Sequence) -> list[str]:
    counts = Counter(d.op for d in decisions)
    return [
        f"{count} {op}{'s' if count > 1 else ''} of two activations (attention): nothing to factorize"
        for op, count in counts.items()
    ]


def _status(decision) -> tuple[str, str | None, str | None]:
    """The status cell, the note explaining it, and the row's style."""
    primary = getattr(decision, "shared_primary", None)
    if primary:
        return "shared", f"shares its weight with {primary}, whose row counts the saving", None
    if decision.status == "factorized":
        return "factorized", None, "green"
    return decision.status, decision.reason, "yellow"


def render_report(report: Report, console: Console, fmt: str = "table") -> None:
    columns = [
        Column("layer", name=True),
        Column("op", drop=5),
        Column("weight", drop=6),
        Column("rank", right=True),
        Column("energy", right=True, drop=3),
        Column("params", right=True, drop=2),
        Column("MACs", right=True, drop=4),
        Column("status"),
    ]
    calibrated = report.calibration is not None
    if calibrated:  # after status, dropped first on a narrow terminal
        columns += [Column("method", drop=7), Column("calib err fit/held (svd)", right=True, drop=8)]
    grouped = any(layer.decision.group_compare for layer in report.layers)
    if grouped:  # group low rank against plain low rank (same rank | same params)
        columns += [
            Column("w err grp|plain r|plain p", right=True, drop=9),
            Column("arrays grp|plain p", right=True, drop=10),
        ]
    records = [
        layer.to_dict() | {"shared_primary": getattr(layer.decision, "shared_primary", None)}
        for layer in report.layers
    ]
    sheet = Sheet("lrdeploy compress", columns, records=records)
    dynamic = [layer.decision for layer in report.layers if is_dynamic(layer.decision)]
    shown = [layer for layer in report.layers if not is_dynamic(layer.decision)]
    for layer in shown:
        d = layer.decision
        rank = f"{d.rank}/{d.full_rank}" if d.rank else (f"-/{d.full_rank}" if d.full_rank else "-")
        energy = f"{100 * d.energy_kept:.1f}%" if d.energy_kept is not None else "-"
        params = (
            f"{format_count(layer.params_before)}→{format_count(layer.params_after)}"
            if layer.params_before is not None
            else "-"
        )
        macs = f"{format_count(layer.macs_before)}→{format_count(layer.macs_after)}"
        status, note, style = _status(d)
        row = [d.name, d.op, _shape(d.weight_shape), rank, energy, params, macs, status]
        if calibrated:
            row += [d.method or "-", _calib_errors(d.calib)]
        if grouped:
            row += _group_cells(d.group_compare)
        sheet.add(row, note, style)
    sheet.footer = (
        [
            "total",
            "",
            "",
            f"{len(report.factorized)}/{len(shown)}",
            "",
            f"{format_count(report.params_before)}→{format_count(report.params_after)}",
            f"{format_count(report.macs_before)}→{format_count(report.macs_after)}",
            "",
        ]
        + (["", ""] if calibrated else [])
        + (["", ""] if grouped else [])
    )
    print_sheet(sheet, console, fmt)
    if fmt == "csv":
        return
    for line in _dynamic_summary(dynamic):
        print_line(console, line, fmt=fmt)
    folded = [b for b in report.batchnorm if b["status"] == "folded"]
    kept = [b for b in report.batchnorm if b["status"] != "folded"]
    if report.batchnorm:
        print_line(console, f"BatchNormalization: {len(folded)} folded, {len(kept)} kept", fmt=fmt)
        for bn in kept:
            print_line(console, f"  kept {bn['name']}: {bn['reason']}", fmt=fmt)
    at = f" at {format_shapes(report.input_shapes)}" if report.input_shapes else ""
    print_line(
        console,
        f"params {format_count(report.params_before)} → {format_count(report.params_after)}"
        f"{_ratio(report.params_before, report.params_after)}, "
        f"MACs {format_count(report.macs_before)} → {format_count(report.macs_after)}"
        f"{_ratio(report.macs_before, report.macs_after)}{at}",
        fmt=fmt,
    )
    for line in _budget_lines(report) + _deployment_lines(report):
        print_line(console, line, fmt=fmt)
    for note in report.notes:
        print_line(console, note, fmt=fmt)
    if report.imc is not None:
        from lrdeploy.cli.render_imc import render_imc

        render_imc(report.imc, console, fmt)


def _group_cells(compare) -> list[str]:
    """Relative weight errors, and arrays when an IMC array was given, of group low rank | plain low
    rank at the same rank | plain low rank at the same parameter count."""
    if not compare:
        return ["-", "-"]
    same_rank, same_params = compare["plain_same_rank"], compare["plain_same_params"]
    errors = "|".join(f"{e['error']:.3f}" for e in (compare, same_rank, same_params))
    arrays = f"{compare['arrays']}|{same_params['arrays']}" if "arrays" in compare else "-"
    return [errors, arrays]


def _calib_errors(errors) -> str:
    """The layer's relative output error on the fit and held-apart calibration rows, plain SVD's after."""
    if not errors:
        return "-"

    def pair(fit: float | None, held: float | None) -> str:
        return "/".join("-" if v is None else f"{v:.3f}" for v in (fit, held))

    return f"{pair(errors['fit'], errors['holdout'])} ({pair(errors['svd_fit'], errors['svd_holdout'])})"


def _budget_lines(report: Report) -> list[str]:
    lines = []
    if report.budget:
        b = report.budget
        achieved = "-" if b.get("achieved") is None else f"{b['achieved']:.3f}"
        counts = f"counting {b['counts']}; " if b.get("counts") else ""
        lines.append(
            f"budget: {b['target']:g} of the {b['kind']} asked, {achieved} achieved "
            f"({counts}allocated by {b['allocator']}; {b['cheapest']:.3f} is the least reachable)"
        )
        if b.get("exhausted"):
            lines.append("  every layer is at its least error: more rank would remove nothing")
    if report.calibration:
        c = report.calibration
        fallbacks = sum(1 for layer in report.factorized if layer.decision.fallback)
        lines.append(
            f"calibration: {c['source']}, {c['held_apart']} of {c['samples']} samples held apart; "
            f"{format_count(c['rows_fit'])} fit / {format_count(c['rows_held_apart'])} held-apart rows over "
            f"all layers; {fallbacks} layer(s) fell back to plain SVD"
        )
    return lines


def _deployment_lines(report: Report) -> list[str]:
    """The end-to-end latency check of ``--cost latency`` and the deployed precision's weight bytes."""
    lines = []
    if report.latency and "speedup" not in report.latency:
        t = report.latency
        lines.append(
            f"latency on {t['provider']} (batch {t['batch']}): predicted {t['predicted_ms']:.3g} ms of "
            f"{t['dense_predicted_ms']:.3g} dense; end-to-end check {t['check']}"
        )
    elif report.latency:
        t = report.latency
        reverted = f"; {len(t['reverted'])} layer(s) reverted to dense to get there" if t["reverted"] else ""
        lines.append(
            f"latency on {t['provider']} (batch {t['batch']}): predicted {t['predicted_ms']:.3g} ms of "
            f"{t['dense_predicted_ms']:.3g} dense; measured {t['measured_output_ms']:.3g} ms vs input "
            f"{t['measured_input_ms']:.3g} ms ({t['speedup']:.2f}×, p50 of interleaved runs){reverted}"
        )
    if report.precision:
        p = report.precision
        mib = 2**20
        lines.append(
            f"deployed as {p['precision']}: weights {p['weight_bytes_input'] / mib:.2f} MiB → "
            f"{p['weight_bytes_factorized_fp32'] / mib:.2f} MiB factorized → "
            f"{p['weight_bytes_output'] / mib:.2f} MiB"
        )
    return lines


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def render_verification(verification: Verification, console: Console, fmt: str = "table") -> None:
    """One line: where it ran, on what, and the worst numbers over the outputs."""
    if verification.note:
        print_line(console, verification.note, "yellow", fmt)
    parts = [f"max |Δ| {verification.max_abs_diff:.3g}"]
    if verification.rel_l2 is not None:
        parts += [f"rel L2 {verification.rel_l2:.3g}", f"cosine {verification.cosine:.6f}"]
    matches = [o.exact_match for o in verification.outputs if o.exact_match is not None]
    if matches:
        parts.append(f"ids/masks equal {_percent(min(matches))}")
    if verification.top1_agreement is not None:
        few = f" ({verification.samples} samples: too few for a rate)" if verification.few_samples else ""
        parts.append(f"top-1 agreement {_percent(verification.top1_agreement)}{few}")
    scored = verification.scored
    if scored is not None:
        parts.append(
            f"accuracy {_percent(scored.accuracy_original)} → {_percent(scored.accuracy_compressed)}"
        )
    where = f"verified on {verification.provider} with {verification.data}"
    print_line(console, f"{where}, {verification.samples} sample(s): " + ", ".join(parts), fmt=fmt)
    if verification.warning:  # users read the last line: say it there even when no gate was set
        print_line(console, f"warning: {verification.warning}", "yellow", fmt)


def render_verification_table(verification: Verification, console: Console, fmt: str = "table") -> None:
    columns = [
        Column("output", name=True),
        Column("shape", drop=9),
        Column("max |Δ|", right=True),
        Column("rel L2", right=True),
        Column("cosine", right=True, drop=2),
        Column("equal", right=True, drop=3),
        Column("top-1", right=True, drop=1),
        Column("top-5", right=True, drop=4),
        Column("acc orig", right=True, drop=5),
        Column("acc new", right=True, drop=5),
    ]
    title = f"lrdeploy verify ({verification.provider}, {verification.data})"
    sheet = Sheet(title, columns, records=[asdict(out) for out in verification.outputs])
    for out in verification.outputs:
        sheet.add(
            [
                out.name,
                _shape(out.shape),
                f"{out.max_abs_diff:.3g}",
                "-" if out.rel_l2 is None else f"{out.rel_l2:.3g}",
                "-" if out.cosine is None else f"{out.cosine:.6f}",
                _percent(out.exact_match),
                _percent(out.top1_agreement),
                _percent(out.top5_agreement),
                _percent(out.accuracy_original),
                _percent(out.accuracy_compressed),
            ]
        )
    print_sheet(sheet, console, fmt)
    if fmt == "csv":
        return
    if verification.note:
        print_line(console, verification.note, "yellow", fmt)
    print_line(console, f"{verification.samples} sample(s)", fmt=fmt)


def render_bench(result: BenchResult, console: Console, fmt: str = "table") -> None:
    config = result.config
    threads = f", {config.threads} threads" if config.threads else ""
    title = f"lrdeploy bench ({result.provider}{threads}; median of {config.runs} interleaved rounds)"
    columns = [
        Column("model", name=True),
        Column("batch", right=True),
        Column("p50 ms", right=True),
        Column("p90 ms", right=True, drop=5),
        Column("p99 ms", right=True, drop=6),
        Column("mean ms", right=True, drop=7),
        Column("items/s", right=True, drop=3),
        Column("MACs", right=True, drop=4),
        Column("speedup", right=True),
        Column("MAC ÷", right=True, drop=2),
        Column("efficiency", right=True, drop=1),
    ]
    records = [{k: v for k, v in row.items() if k != "latencies_ms"} for row in result.to_dict()["results"]]
    sheet = Sheet(title, columns, records=records)
    for timing in result.timings:
        speedup, reduction, efficiency = (
            result.speedup(timing),
            result.mac_reduction(timing),
            result.efficiency(timing),
        )
        sheet.add(
            [
                timing.model,
                timing.batch,
                f"{timing.p50:.3f}",
                f"{timing.percentile(90):.3f}",
                f"{timing.percentile(99):.3f}",
                f"{timing.mean:.3f}",
                f"{timing.throughput:.1f}",
                format_count(timing.macs),
                f"{speedup:.2f}×" if speedup else "-",
                f"{reduction:.2f}×" if reduction else "-",
                f"{efficiency:.2f}" if efficiency else "-",
            ]
        )
    print_sheet(sheet, console, fmt)
    if fmt == "csv":
        return
    if result.note:
        print_line(console, result.note, "yellow", fmt)
    for skipped in result.skipped:
        print_line(console, f"skipped {skipped}", fmt=fmt)


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


def _inspected_errors(errors: dict | None) -> str:
    """Relative output error on the calibration rows at rank ratio 0.25: plain SVD → whitened."""
    if not errors:
        return "-"
    return f"{errors['svd'][1]:.3f}→{errors['whiten'][1]:.3f}"


def render_inspection(inspection, console: Console, fmt: str = "table") -> None:
    columns = [
        Column("layer", name=True),
        Column("op", drop=7),
        Column("weight", drop=8),
        Column("m×n", right=True, drop=6),
        Column("full", right=True),
        Column("E@10%", right=True, drop=3),
        Column("E@25%", right=True),
        Column("E@50%", right=True, drop=4),
        Column("r@90%", right=True, drop=2),
        Column("r@99%", right=True),
        Column("break-even", right=True, drop=5),
        Column("MACs", right=True, drop=9),
    ]
    calibrated = any(layer.output_errors for layer in inspection.layers)
    if calibrated:
        columns.append(Column("out err @25% svd→whiten", right=True, drop=10))
    sheet = Sheet("factorizable layers (BN folded)", columns, note_column=0)
    for layer in inspection.layers:
        others = layer.names[1:]
        note = f"the same weight is also read by {', '.join(others)}" if others else None
        sheet.add(
            [
                layer.names[0],
                layer.op,
                _shape(layer.weight_shape),
                f"{layer.m}×{layer.n}",
                layer.full_rank,
                *(f"{100 * layer.energy_at(r):.1f}%" for r in (0.1, 0.25, 0.5)),
                *(layer.rank_for(e) for e in (0.9, 0.99)),
                layer.break_even_rank(),
                format_count(layer.macs),
                *([_inspected_errors(layer.output_errors)] if calibrated else []),
            ],
            note,
        )
    print_sheet(sheet, console, fmt)
    if fmt == "csv":
        return
    print_line(
        console,
        "E@x: fraction of Σσ² kept at rank ratio x; r@e: smallest rank keeping energy e; "
        "break-even: largest rank that still saves parameters; "
        f"MACs at {format_shapes(inspection.input_shapes)} "
        f"(model total {format_count(inspection.total_macs)})",
        fmt=fmt,
    )
    dynamic = [d for d in inspection.skipped if is_dynamic(d)]
    for line in _dynamic_summary(dynamic):
        print_line(console, line, fmt=fmt)
    for decision in inspection.skipped:
        if not is_dynamic(decision):
            macs = inspection.macs.get(decision.name)
            cost = f", {format_count(macs)} MACs" if decision.name in inspection.macs else ""
            print_line(
                console,
                f"  not factorizable {decision.name} ({decision.op}{cost}): {decision.reason}",
                fmt=fmt,
            )
    folded = sum(1 for b in inspection.batchnorm if b["status"] == "folded")
    if inspection.batchnorm:
        print_line(
            console,
            f"BatchNormalization: {folded} foldable, {len(inspection.batchnorm) - folded} not",
            fmt=fmt,
        )
