"""The bundled MNIST models on in-memory-computing crossbars: arrays, utilization and cycles at 128×128 and
256×256, and test accuracy under programming noise and ADC resolution, dense, plain low rank, group low
rank and array-aware side by side.

    python benchmarks/imc_mnist.py          # writes models/RESULTS_imc.md, .json, imc_mnist.png (~11 min)
    python benchmarks/imc_mnist.py --digits 200 --runs 1 --out /tmp/imc   # a quick look

Per family (LeNet-5, VGG): the plainly trained model dense (the reference), and the LRPET-trained model
dense and compressed with `lrdeploy.compress` four ways, the same layers excluded (models/README.md):

- plain low rank at the model's recommended rank ratio;
- group low rank (``groups=2`` and ``4``) at the same rank ratio per group (the paper's comparison: more
  weights, less error), and ``groups=2`` at the same parameter count (``target_params`` = what plain low
  rank kept; the budget allocates the ranks);
- array-aware: ``cost="imc-cycles"``, ``imc_mapping="vwsdk"`` on 128×128 arrays at the VW-SDK cycles
  plain low rank reaches, so the comparison is at equal cycles.

Mapping only (no accuracy): ``cost="imc-arrays"`` at 1.0 (what an arrays budget can buy on these small
layers) and a MACs budget at the MACs the array-aware model spends (what counting cycles instead of MACs
bought). Accuracy is on the first --digits bundled test digits with `lrdeploy.imc.simulate` on 128×128
arrays (8-bit DAC, calibrated ADC ranges), mean ± std over --runs programming-noise draws.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lrdeploy
from lrdeploy.imc import map_model
from lrdeploy.imc.analog import NoiseSettings
from lrdeploy.imc.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {
    "lenet5": (
        "lenet5_baseline",
        "lenet5_lrpet_keep_r0.135",
        {"rank_ratio": 0.135, "exclude": ("conv1", "fc3")},
    ),
    "vgg": ("vgg_baseline", "vgg_lrpet_keep_r0.160", {"rank_ratio": 0.16, "exclude": ("features.0", "fc2")}),
}
ARRAYS = ((128, 128), (256, 256))
#: (weight noise, ADC bits): the noise sweep at 8 bits, then the ADC sweep at 2% noise.
SETTINGS = ((0.0, 8), (0.02, 8), (0.05, 8), (0.02, 6), (0.02, 4))
MACHINE = "this project's 2-core CPU container"


GROUPS = (2, 4)
CYCLES_ARRAY = "128x128"
PLAIN, CYCLE_AWARE = "low rank", "cycle-aware"


def _models(families: list[str]) -> tuple[dict[str, object], dict[str, object]]:
    """(label → model simulated, label → model only mapped): paths or compressed protos."""
    models: dict[str, object] = {}
    mapped: dict[str, object] = {}
    for family in families:
        baseline, lrpet, options = FAMILIES[family]
        ratio, exclude = options["rank_ratio"], options["exclude"]
        models[baseline] = ROOT / "models" / f"{baseline}.onnx"
        for groups in (1, 2):  # what group low rank recovers on a model not trained for low rank
            label = f"{baseline} → {PLAIN}" if groups == 1 else f"{baseline} → group G={groups}"
            models[label], _ = lrdeploy.compress(
                models[baseline], verify=False, rank_ratio=ratio, groups=groups, exclude=exclude
            )
        path = ROOT / "models" / f"{lrpet}.onnx"
        models[lrpet] = path
        plain, report = lrdeploy.compress(path, verify=False, rank_ratio=ratio, exclude=exclude)
        models[f"{lrpet} → {PLAIN}"] = plain
        kept = report.params_after / report.params_before
        for groups in GROUPS:  # the paper's comparison: the same rank (per group)
            models[f"{lrpet} → group G={groups}"], _ = lrdeploy.compress(
                path, verify=False, rank_ratio=ratio, groups=groups, exclude=exclude
            )
        models[f"{lrpet} → group G=2, same params"], _ = lrdeploy.compress(
            path, verify=False, target_params=kept, groups=2, exclude=exclude
        )
        dense, low = (map_model(m, array=CYCLES_ARRAY, mappings="vwsdk").total() for m in (path, plain))
        target = math.floor(1000 * low["cycles"]["vwsdk"] / dense["cycles"]["vwsdk"]) / 1000
        aware, report = lrdeploy.compress(
            path, verify=False, cost="imc-cycles", imc_mapping="vwsdk", imc_array=CYCLES_ARRAY,
            target=target, exclude=exclude,
        )  # fmt: skip
        models[f"{lrpet} → {CYCLE_AWARE}"] = aware
        macs = min(1.0, report.macs_after / report.macs_before)
        mapped[f"{lrpet} → same-MACs budget"], _ = lrdeploy.compress(
            path, verify=False, target_macs=macs, exclude=exclude
        )
        mapped[f"{lrpet} → imc-arrays 1.0"], _ = lrdeploy.compress(
            path, verify=False, cost="imc-arrays", imc_array=CYCLES_ARRAY, target=1.0, exclude=exclude
        )
    return models, mapped


def _mapping(models: dict[str, object]) -> list[dict]:
    rows = []
    for label, model in models.items():
        for array in ARRAYS:
            total = map_model(model, array=array, mappings=("im2col", "sdk", "vwsdk")).total()
            rows.append({"model": label, "array": f"{array[0]}x{array[1]}", **total})
    return rows


def _accuracy(models: dict[str, object], digits: int, runs: int) -> list[dict]:
    rows = []
    for label, model in models.items():
        for noise, adc in SETTINGS:
            settings = NoiseSettings(weight_noise=noise, dac_bits=8, adc_bits=adc, runs=runs)
            result = simulate(
                model, array=(128, 128), data="mnist", limit=digits, settings=settings, batch_size=100
            )
            entry = result["models"][0]
            rows.append(
                {
                    "model": label,
                    "weight_noise": noise,
                    "adc_bits": adc,
                    **{k: entry[k] for k in ("mean", "std", "runs", "noiseless")},
                }
            )
            print(
                f"{label:40s} noise {noise:.2f} ADC {adc}: {entry['mean']:.4f} ± {entry['std']:.4f}",
                flush=True,
            )
    return rows


def _markdown(mapping: list[dict], accuracy: list[dict], args, seconds: float) -> str:
    lines = [
        "# The bundled MNIST models on IMC crossbars",
        "",
        f"Made by `python benchmarks/imc_mnist.py --digits {args.digits} --runs {args.runs}` on {MACHINE} "
        f"in {seconds / 60:.1f} min. See docs/imc.md for the model of the arrays and the simulation.",
        "",
        "## Headline",
        "",
        *_headline(mapping, accuracy),
        "",
        "## Arrays, utilization and cycles (one inference)",
        "",
        "| model | array | arrays | utilization | im2col cycles | SDK cycles | VW-SDK cycles |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in mapping:
        lines.append(
            f"| {row['model']} | {row['array']} | {row['arrays']} | {100 * row['utilization']:.1f}% | "
            f"{row['cycles']['im2col']:,} | {row['cycles']['sdk']:,} | {row['cycles']['vwsdk']:,} |"
        )
    settings = [f"{noise:.0%} / {adc}-bit" for noise, adc in SETTINGS]
    lines += [
        "",
        f"## Test accuracy on noisy 128×128 crossbars ({args.digits} digits, mean ± std of {args.runs} runs)",
        "",
        "Columns: programming noise (σ ÷ each column's max |w|) / ADC bits; 8-bit DAC; each tile's ADC "
        "calibrated to its largest |partial sum|. "
        "`digital`: the model on onnxruntime without the crossbar.",
        "",
        "| model | digital | " + " | ".join(settings) + " |",
        "|---|---:|" + "---:|" * len(settings),
    ]
    for label in dict.fromkeys(row["model"] for row in accuracy):
        cells = [row for row in accuracy if row["model"] == label]
        values = " | ".join(f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" for r in cells)
        lines.append(f"| {label} | {100 * cells[0]['noiseless']:.2f} | {values} |")
    lines += ["", "![accuracy under programming noise](imc_mnist.png)", ""]
    return "\n".join(lines)


_STYLES = {PLAIN: "--", "group": ":", CYCLE_AWARE: "-."}


def _plot(accuracy: list[dict], path: Path) -> None:
    """Accuracy against programming noise (8-bit ADC) and against ADC bits (2% noise), for the models
    that work digitally (≥ 90%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (noise_axis, adc_axis) = plt.subplots(1, 2, figsize=(12, 5), dpi=120)
    labels = [
        label for label in dict.fromkeys(r["model"] for r in accuracy) if _digital(accuracy, label) >= 0.9
    ]
    colors = plt.cm.tab20.colors  # 10 colours repeat with 14 models
    for index, label in enumerate(labels):
        style = next((st for key, st in _STYLES.items() if key in label), "-")
        rows = [r for r in accuracy if r["model"] == label]
        for axis, pick, key, scale in (
            (noise_axis, lambda r: r["adc_bits"] == 8, "weight_noise", 100),
            (adc_axis, lambda r: r["weight_noise"] == 0.02, "adc_bits", 1),
        ):
            points = sorted((scale * r[key], 100 * r["mean"], 100 * r["std"]) for r in rows if pick(r))
            xs, ys, es = zip(*points, strict=True)
            axis.errorbar(xs, ys, es, fmt=style, marker="o", label=label, capsize=3, color=colors[index % 20])
    noise_axis.set_xlabel("programming noise (% of column max |w|), 8-bit ADC")
    adc_axis.set_xlabel("ADC bits, 2% programming noise")
    for axis in (noise_axis, adc_axis):
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
    adc_axis.legend(fontsize=6)
    figure.suptitle("MNIST on 128×128 crossbars, 8-bit DAC (models ≥ 90% digitally)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _digital(accuracy: list[dict], label: str) -> float:
    return next(r["noiseless"] for r in accuracy if r["model"] == label)


def _row(rows: list[dict], label: str, **match) -> dict | None:
    return next((r for r in rows if r["model"] == label and all(r[k] == v for k, v in match.items())), None)


def _compared(mapping: list[dict], accuracy: list[dict], model: str, what: str) -> str:
    """One model's variants: arrays / VW-SDK cycles on 128×128, digital accuracy / at 5% noise."""
    parts = []
    groups = (*(f" → group G={g}" for g in GROUPS), " → group G=2, same params")
    for suffix in ("", f" → {PLAIN}", *groups, f" → {CYCLE_AWARE}"):
        mapped = _row(mapping, model + suffix, array="128x128")
        noisy = _row(accuracy, model + suffix, weight_noise=0.05, adc_bits=8)
        if mapped is None or noisy is None:
            continue
        parts.append(
            f"{suffix[3:] or 'dense'} {mapped['arrays']} / {mapped['cycles']['vwsdk']:,} / "
            f"{100 * noisy['noiseless']:.1f}% / {100 * noisy['mean']:.1f} ± {100 * noisy['std']:.1f}%"
        )
    return f"- **{model}** ({what}): " + "; ".join(parts) + "."


def _headline(mapping: list[dict], accuracy: list[dict]) -> list[str]:
    """Per model: each compression's arrays, VW-SDK cycles (128×128), digital accuracy and accuracy at 5%
    programming noise; then what counting cycles bought."""
    lines = [
        "Each entry: arrays / VW-SDK cycles on 128×128 arrays / digital test accuracy / accuracy at 5% "
        "programming noise with an 8-bit ADC.",
        "",
    ]
    for baseline, lrpet, _options in FAMILIES.values():
        if _row(mapping, lrpet) is None:
            continue
        lines.append(_compared(mapping, accuracy, baseline, "plainly trained"))
        lines.append(_compared(mapping, accuracy, lrpet, "LRPET-trained"))
        aware = _row(mapping, f"{lrpet} → {CYCLE_AWARE}", array="128x128")
        same = _row(mapping, f"{lrpet} → same-MACs budget", array="128x128")
        arrays_only = _row(mapping, f"{lrpet} → imc-arrays 1.0", array="128x128")
        dense = _row(mapping, lrpet, array="128x128")
        if aware and same and arrays_only and dense:
            lines.append(
                f"  Counting cycles instead of MACs: a MACs budget at the cycle-aware model's MACs needs "
                f"{same['arrays']} arrays and {same['cycles']['vwsdk']:,} cycles (cycle-aware: "
                f"{aware['arrays']}, {aware['cycles']['vwsdk']:,}). An arrays budget at 1.0 keeps "
                f"{arrays_only['arrays']} of {dense['arrays']} arrays: no rank saves one here."
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--digits", type=int, default=300)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "models")
    args = parser.parse_args()
    start = time.perf_counter()
    models, mapped = _models(args.families)
    mapping = _mapping(models | mapped)
    accuracy = _accuracy(models, args.digits, args.runs)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "RESULTS_imc.json").write_text(
        json.dumps({"mapping": mapping, "accuracy": accuracy}, indent=2) + "\n"
    )
    (args.out / "RESULTS_imc.md").write_text(_markdown(mapping, accuracy, args, seconds))
    _plot(accuracy, args.out / "imc_mnist.png")
    print(f"wrote {args.out / 'RESULTS_imc.md'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
