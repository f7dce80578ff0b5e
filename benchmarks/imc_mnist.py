"""The bundled MNIST models on in-memory-computing crossbars: arrays, utilization and cycles at 128×128 and
256×256, and test accuracy under programming noise and ADC resolution, dense vs low rank side by side.

    python benchmarks/imc_mnist.py          # writes models/RESULTS_imc.md, .json, imc_mnist.png (~5 min)
    python benchmarks/imc_mnist.py --digits 200 --runs 2 --out /tmp/imc   # a quick look

Each family (LeNet-5, VGG) appears four times: the plainly trained model and the LRPET-trained one, dense
and compressed with `lrdeploy.compress` at the LRPET model's recommended settings (models/README.md), the
same settings for both so that only the training differs. Accuracy is on the first --digits bundled test
digits with `lrdeploy.imc.simulate` on 128×128 arrays (8-bit DAC, calibrated ADC ranges), mean ± std
over --runs programming-noise draws.
"""

from __future__ import annotations

import argparse
import json
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


def _models(families: list[str]) -> dict[str, object]:
    """Label → model (a path, or the compressed proto)."""
    models: dict[str, object] = {}
    for family in families:
        baseline, lrpet, options = FAMILIES[family]
        for name in (baseline, lrpet):
            path = ROOT / "models" / f"{name}.onnx"
            models[name] = path
            compressed, _ = lrdeploy.compress(path, verify=False, **options)
            models[f"{name} → low rank"] = compressed
    return models


def _mapping(models: dict[str, object]) -> list[dict]:
    rows = []
    for label, model in models.items():
        for array in ARRAYS:
            total = map_model(model, array=array, mappings=("im2col", "vwsdk")).total()
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
        "| model | array | arrays | utilization | im2col cycles | VW-SDK cycles |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in mapping:
        lines.append(
            f"| {row['model']} | {row['array']} | {row['arrays']} | {100 * row['utilization']:.1f}% | "
            f"{row['cycles']['im2col']:,} | {row['cycles']['vwsdk']:,} |"
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


def _plot(accuracy: list[dict], path: Path) -> None:
    """Accuracy against programming noise (8-bit ADC) and against ADC bits (2% noise), for the models
    that work digitally (≥ 90%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (noise_axis, adc_axis) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    labels = [
        label for label in dict.fromkeys(r["model"] for r in accuracy) if _digital(accuracy, label) >= 0.9
    ]
    for label in labels:
        style = "--" if "low rank" in label else "-"
        rows = [r for r in accuracy if r["model"] == label]
        for axis, pick, key, scale in (
            (noise_axis, lambda r: r["adc_bits"] == 8, "weight_noise", 100),
            (adc_axis, lambda r: r["weight_noise"] == 0.02, "adc_bits", 1),
        ):
            points = sorted((scale * r[key], 100 * r["mean"], 100 * r["std"]) for r in rows if pick(r))
            xs, ys, es = zip(*points, strict=True)
            axis.errorbar(xs, ys, es, fmt=style, marker="o", label=label, capsize=3)
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


def _headline(mapping: list[dict], accuracy: list[dict]) -> list[str]:
    """One line per LRPET model: what low rank does to arrays, utilization, cycles and noisy accuracy."""
    lines = []
    for _, lrpet, options in FAMILIES.values():
        dense = next((r for r in mapping if r["model"] == lrpet and r["array"] == "128x128"), None)
        if dense is None:
            continue
        low = next(r for r in mapping if r["model"] == f"{lrpet} → low rank" and r["array"] == "128x128")
        noisy = {
            label: next(
                r
                for r in accuracy
                if r["model"] == label and r["weight_noise"] == 0.05 and r["adc_bits"] == 8
            )
            for label in (lrpet, f"{lrpet} → low rank")
        }
        a, b = (noisy[label] for label in (lrpet, f"{lrpet} → low rank"))
        arrays = f"arrays {dense['arrays']} → {low['arrays']}"
        use = f"utilization {100 * dense['utilization']:.1f}% → {100 * low['utilization']:.1f}%"
        cycles = f"VW-SDK cycles {dense['cycles']['vwsdk']:,} → {low['cycles']['vwsdk']:,}"
        dense_acc = f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f}%"
        low_acc = f"{100 * b['mean']:.2f} ± {100 * b['std']:.2f}%"
        lines.append(
            f"- **{lrpet}** at rank ratio {options['rank_ratio']} on 128×128 arrays: {arrays}, {use}, "
            f"{cycles}; accuracy at 5% programming noise {dense_acc} dense vs {low_acc} low rank."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--digits", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "models")
    args = parser.parse_args()
    start = time.perf_counter()
    models = _models(args.families)
    mapping = _mapping(models)
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
