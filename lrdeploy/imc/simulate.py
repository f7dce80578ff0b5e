"""Accuracy on simulated crossbars: Monte Carlo over programming-noise draws (`lrdeploy.imc.analog`),
run on onnxruntime, the task metric's mean ± std per model.

- The metric: top-1 accuracy when the data has labels; otherwise the outputs' relative L2 error
  ‖y − y₀‖ / ‖y₀‖ over all outputs and samples, against the noiseless (digital) outputs of the *first*
  model, so a compressed model's figure includes what compression lost.
- Input ranges (the DAC's R) are calibrated once per model and layer: the largest |x| the layer reads
  when the noiseless model runs on the same data; by default each tile's ADC range likewise (the
  largest |partial sum| of the noiseless tile), see `lrdeploy.imc.analog`.
- Runs differ only in their seed (seed, seed+1, ...); without weight or output noise one run is made.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from lrdeploy.errors import UsageError
from lrdeploy.imc.analog import NoiseSettings, analog_layers, analog_model, partial_sums
from lrdeploy.imc.mapping import ArraySize, parse_array
from lrdeploy.io.modelio import load_model, materialize
from lrdeploy.passes.inline import inline_layer_functions
from lrdeploy.passes.names import name_nodes
from lrdeploy.passes.upgrade import upgrade_opset
from lrdeploy.runtime.datasets import ImageOptions, as_data_source, load_dataset, random_batches
from lrdeploy.runtime.inputs import model_inputs, resolve_shapes
from lrdeploy.runtime.sessions import make_session, select_device

__all__ = ["NoiseSettings", "image_options", "simulate", "simulate_models"]

Feeds = dict[str, np.ndarray]
Progress = Callable[[int, int], None]
#: Random inputs when no data is given: this many batches.
RANDOM_BATCHES = 4


def image_options(scale: float, mean: str, std: str) -> ImageOptions:
    from lrdeploy.cli.options import parse_floats

    return ImageOptions(None, None, scale, parse_floats(mean, "--mean"), parse_floats(std, "--std"))


def _prepared(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    model, path = load_model(source)
    model, _ = inline_layer_functions(upgrade_opset(materialize(model))[0])
    name_nodes(model.graph)
    return model, str(path) if path else "the given model"


class _Runner:
    """Runs models on fixed batches: one session per model, on the CPU."""

    def __init__(self, batches: list[Feeds]) -> None:
        self.batches = batches
        self.device = select_device("cpu")

    def outputs(self, model: onnx.ModelProto, names: Sequence[str] | None = None) -> list[list[np.ndarray]]:
        session = make_session(model.SerializeToString(), self.device, label="the simulated model")
        return [session.run(list(names) if names else None, feeds) for feeds in self.batches]


def _calibrate(model: onnx.ModelProto, runner: _Runner) -> dict[str, float]:
    """Node name → the largest |x| its data input takes on the batches (the DAC's range)."""
    layers = analog_layers(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {value.name for value in probe.graph.output}
    for name in dict.fromkeys(layer.data for layer in layers):
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    names = [layer.data for layer in layers]
    ranges = dict.fromkeys((layer.node.name for layer in layers), 0.0)
    for results in runner.outputs(probe, list(dict.fromkeys(names))):
        by_name = dict(zip(dict.fromkeys(names), results, strict=True))
        for layer in layers:
            ranges[layer.node.name] = max(ranges[layer.node.name], float(np.max(np.abs(by_name[layer.data]))))
    return ranges


def _calibrate_adc(
    model: onnx.ModelProto, ranges: Mapping[str, float], settings: NoiseSettings, rows: int, runner: _Runner
) -> dict[str, float] | None:
    """Tile → the largest |partial sum| of the noiseless tiles (DAC applied): each ADC's full scale."""
    if settings.adc_bound is not None or not (settings.adc_bits or settings.output_noise):
        return None
    ideal = NoiseSettings(weight_noise=0.0, dac_bits=settings.dac_bits, adc_bits=0, adc_bound=1.0)
    probe = analog_model(model, ranges, ideal, rows, seed=0)
    tiles = partial_sums(probe)
    for name in tiles.values():
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    full = dict.fromkeys(tiles, 0.0)
    for results in runner.outputs(probe, list(tiles.values())):
        for tile, values in zip(tiles, results, strict=True):
            full[tile] = max(full[tile], float(np.max(np.abs(values))))
    return full


def _metric(
    outputs: list[list[np.ndarray]], labels: np.ndarray | None, reference: list[list[np.ndarray]]
) -> float:
    if labels is not None:
        predicted = np.concatenate([batch[0].reshape(len(batch[0]), -1).argmax(axis=1) for batch in outputs])
        return float(np.mean(predicted == labels[: len(predicted)]))
    error = sum(
        float(np.sum((a.astype(np.float64) - b) ** 2))
        for x, y in zip(outputs, reference, strict=True)
        for a, b in zip(x, y, strict=True)
    )
    scale = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for y in reference for b in y)
    return math.sqrt(error / max(scale, 1e-300))


def _batches(
    model: onnx.ModelProto,
    data: object,
    shapes: Mapping[str, tuple[int, ...]] | None,
    batch_size: int,
    limit: int | None,
    image: ImageOptions | None,
    seed: int,
) -> tuple[list[Feeds], np.ndarray | None, str]:
    source = as_data_source(data)
    if source is None or source == "random":
        resolved = resolve_shapes(model, shapes)
        batches = list(random_batches(model, resolved, seed, RANDOM_BATCHES))
        return batches, None, f"random inputs ({RANDOM_BATCHES} batches)"
    dataset = load_dataset(source, model, image, limit)
    fixed = [spec.dims[0] for spec in model_inputs(model) if spec.dims and isinstance(spec.dims[0], int)]
    size = fixed[0] if fixed else batch_size
    labels = None if dataset.labels is None else dataset.labels[: len(dataset)]
    return list(dataset.batches(size, limit)), labels, dataset.description


def simulate(
    model: str | os.PathLike | onnx.ModelProto,
    compressed: str | os.PathLike | onnx.ModelProto | None = None,
    *,
    array: str | tuple[int, int] | ArraySize = (256, 256),
    data: object = "mnist",
    settings: NoiseSettings | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    image: ImageOptions | None = None,
    progress: Progress | None = None,
) -> dict:
    """The task metric of ``model`` (and ``compressed``) on noisy crossbars, as the report's
    ``simulation`` entry: settings, metric name, and per model ``mean``, ``std``, ``runs``, ``values``
    and the ``noiseless`` (digital) figure."""
    settings = settings or NoiseSettings()
    size = parse_array(array)
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: give a positive number")
    models = [_prepared(m) for m in (model, compressed) if m is not None]
    batches, labels, description = _batches(
        models[0][0], data, input_shapes, batch_size, limit, image, settings.seed
    )
    runner = _Runner(batches)
    reference = runner.outputs(models[0][0])
    runs = 1 if settings.noiseless else settings.runs
    done, results = 0, []
    for graph, label in models:
        digital = reference if graph is models[0][0] else runner.outputs(graph)
        ranges = _calibrate(graph, runner)
        adc_ranges = _calibrate_adc(graph, ranges, settings, size.rows, runner)
        values = []
        for run in range(runs):
            analog = analog_model(graph, ranges, settings, size.rows, settings.seed + run, adc_ranges)
            values.append(_metric(runner.outputs(analog), labels, reference))
            done += 1
            if progress is not None:
                progress(done, runs * len(models))
        results.append(
            {
                "model": label,
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "runs": len(values),
                "values": values,
                "noiseless": _metric(digital, labels, reference),
                "layers": len(ranges),
            }
        )
    return {
        "settings": {**settings.to_dict(), "array": [size.rows, size.cols], "data": description},
        "metric": "accuracy" if labels is not None else "rel_error",
        "models": results,
    }


def simulate_models(
    models: Sequence[os.PathLike],
    array: ArraySize,
    settings: NoiseSettings,
    data: object,
    shapes: Mapping[str, tuple[int, ...]] | None,
    batch_size: int,
    limit: int | None,
    image: ImageOptions,
    progress: Progress | None = None,
) -> dict:
    """`simulate` with the command line's arguments."""
    return simulate(
        *models,
        array=array,
        data=data,
        settings=settings,
        input_shapes=shapes,
        batch_size=batch_size,
        limit=limit,
        image=image,
        progress=progress,
    )
