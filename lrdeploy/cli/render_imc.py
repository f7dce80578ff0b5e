"""What ``lrdeploy imc`` prints: the per-layer crossbar mapping of each model, the totals before and after
compression, and the analog simulation's metric; and the ``--plot`` figure."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lrdeploy.cli.render import format_shapes
from lrdeploy.cli.tables import Column, Sheet, print_line, print_sheet
from lrdeploy.errors import UsageError
from lrdeploy.imc.report import ImcReport, ModelMap
from lrdeploy.units import format_count

__all__ = ["plot_imc", "render_imc"]

_LABELS = {"im2col": "im2col", "sdk": "SDK", "vwsdk": "VW-SDK"}


def _matrix(rows: int, cols: int, groups: int) -> str:
    return f"{rows}×{cols}" + (f" ×{groups}g" if groups > 1 else "")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _sheet(mapped: ModelMap, report: ImcReport) -> Sheet:
    mappings = report.mappings
    columns = [
        Column("layer", name=True),
        Column("op", drop=5),
        Column("rows×cols", right=True, drop=3),
        Column("arrays", right=True),
        Column("util", right=True),
        Column("reuse", right=True, drop=4),
        *(
            Column(_LABELS[m], right=True, drop=2 if m == "im2col" and len(mappings) > 1 else 0)
            for m in mappings
        ),
        *([Column("VW-SDK window", drop=6)] if "vwsdk" in mappings else []),
    ]
    sheet = Sheet(f"{mapped.model} on {report.array} arrays (cycles per inference)", columns)
    sheet.records = [layer.to_dict() for layer in mapped.layers]
    for layer in mapped.layers:
        sheet.add(
            [
                layer.name,
                layer.op,
                _matrix(layer.rows, layer.cols, layer.groups),
                layer.arrays,
                _percent(layer.utilization),
                format_count(layer.reuse),
                *(format_count(layer.cycles[m]) for m in mappings),
                *([layer.windows["vwsdk"]] if "vwsdk" in mappings else []),
            ]
        )
    total = mapped.total(report.array)
    sheet.footer = [
        "total",
        "",
        "",
        str(total["arrays"]),
        _percent(total["utilization"]),
        format_count(total["reuse"]),
        *(format_count(total["cycles"][m]) for m in mappings),
        *([""] if "vwsdk" in mappings else []),
    ]
    return sheet


def _ratio(before: float, after: float) -> str:
    return f"{format_count(before)} → {format_count(after)}" + (f" (÷{before / after:.2f})" if after else "")


def render_imc(report: ImcReport, console: Console, fmt: str = "table") -> None:
    for mapped in report.models:
        print_sheet(_sheet(mapped, report), console, fmt)
        if fmt == "csv":
            continue
        for name, op, why in mapped.skipped:
            print_line(console, f"  not mapped {name} ({op}): {why}", fmt=fmt)
    if fmt == "csv":
        return
    print_line(
        console,
        f"at {format_shapes(report.models[0].input_shapes)}; a cycle is one array read (an AR×AC "
        "matrix-vector product); rows×cols per group; util: weight cells ÷ cells of the arrays used",
        fmt=fmt,
    )
    if len(report.models) > 1:
        before, after = (m.total(report.array) for m in report.models)
        parts = [f"arrays {_ratio(before['arrays'], after['arrays'])}"]
        parts += [
            f"{_LABELS[m]} cycles {_ratio(before['cycles'][m], after['cycles'][m])}" for m in report.mappings
        ]
        print_line(console, "compressed vs dense: " + ", ".join(parts), fmt=fmt)
    if report.simulation is not None:
        _render_simulation(report.simulation, console, fmt)


def _render_simulation(simulation: dict, console: Console, fmt: str) -> None:
    settings = simulation["settings"]
    metric = simulation["metric"]
    print_line(
        console,
        "analog simulation: weight noise {weight_noise:g}, DAC {dac_bits} bits, ADC {adc_bits} bits, "
        "output noise {output_noise:g}, {runs} runs from seed {seed}".format(**settings),
        fmt=fmt,
    )
    for result in simulation["models"]:
        value = f"{result['mean']:.4f} ± {result['std']:.4f}"
        noiseless = result.get("noiseless")
        extra = f" (noiseless {noiseless:.4f})" if noiseless is not None else ""
        runs = f"{result['runs']} run" + ("s" if result["runs"] != 1 else "")
        print_line(console, f"  {result['model']}: {metric} {value} over {runs}{extra}", fmt=fmt)


def plot_imc(report: ImcReport, path: Path) -> None:
    """Cycles per layer and mapping (log scale), one panel per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'lrdeploy[plot]'") from None
    count = len(report.models)
    figure, axes = plt.subplots(count, 1, figsize=(7, 3 * count), dpi=120, squeeze=False)
    for axis, mapped in zip(axes[:, 0], report.models, strict=True):
        positions = range(len(mapped.layers))
        width = 0.8 / len(report.mappings)
        for index, mapping in enumerate(report.mappings):
            values = [layer.cycles[mapping] for layer in mapped.layers]
            axis.bar([p + index * width for p in positions], values, width, label=_LABELS[mapping])
        axis.set_yscale("log")
        axis.set_xticks([p + 0.4 - width / 2 for p in positions])
        axis.set_xticklabels([layer.name for layer in mapped.layers], rotation=45, ha="right", fontsize=7)
        axis.set_ylabel("cycles")
        axis.set_title(f"{Path(mapped.model).name} on {report.array} arrays", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
