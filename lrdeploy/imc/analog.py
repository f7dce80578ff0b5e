"""The analog crossbar as a graph transform: every mapped layer of an ONNX model becomes tiles with DAC,
programming noise, output noise and ADC, still standard ONNX, run on onnxruntime.

For a layer y = W·x (Conv, Gemm, MatMul with a constant weight; W seen as cols × rows with rows the
unrolled inputs Cin/groups·Πk in ONNX's weight order):

- DAC: a fixed input range R per layer (calibrated: max |x| the noiseless model sees on the data);
  x_q = round(clip(x, −R, R) / s)·s with s = R / (2^(b−1) − 1). Elementwise, so it is the same for
  every tile.
- tiles: the rows are split into ⌈rows/AR⌉ tiles of balanced size (aihwkit-lightning's
  ``max_input_size`` split); tile t holds W_t = W on its rows and 0 elsewhere, and computes the partial
  sum p_t = W_t·x_q with the layer's own op and attributes (bias left out).
- programming noise, drawn once per run: W_t + ε, ε ~ N(0, (η·max_rows|W_t[col]|)²), η = weight noise,
  the maximum over each physical column of the tile (aihwkit-lightning's ADD_NORMAL_PER_CHANNEL).
- output noise: p_t + N(0, (ν·B_t)²) per output element and inference (ν = output noise).
- ADC: p_q = round(clip(p_t, −B_t, B_t) / q)·q with q = B_t / (2^(b−1) − 1) and the full scale B_t
  either calibrated (the default: the largest |p_t| the noiseless tile gives on the data, DAC applied;
  `partial_sums` names the tensors to measure) or B_t = β·R·max|W_t| with a fixed ADC bound β (clean
  weights; aihwkit-lightning's ``out_bound``, the same for every tile whatever its number of rows).
- digital: y = Σ_t p_q,t + bias (Gemm: β_gemm·C; its α is folded into W first).

Bits of 0 mean an ideal converter. Each tile is a full-size op with zeroed rows, which costs tiles× the
layer's compute but keeps every op standard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lrdeploy.errors import UsageError

__all__ = ["AnalogLayer", "NoiseSettings", "analog_layers", "analog_model", "partial_sums", "tile_bounds"]

MAX_BITS = 16
MAX_RUNS = 10_000


@dataclass(frozen=True)
class NoiseSettings:
    weight_noise: float = 0.02
    dac_bits: int = 8
    adc_bits: int = 8
    output_noise: float = 0.0
    runs: int = 10
    seed: int = 0
    adc_bound: float | None = None  # None: each tile's ADC calibrated to its largest |partial sum|

    def __post_init__(self) -> None:
        for flag, value in (("dac-bits", self.dac_bits), ("adc-bits", self.adc_bits)):
            if not isinstance(value, int) or not (value == 0 or 2 <= value <= MAX_BITS):
                raise UsageError(f"--{flag} {value}: give 0 (ideal) or 2..{MAX_BITS} bits")
        for flag, value in (("weight-noise", self.weight_noise), ("output-noise", self.output_noise)):
            if not (math.isfinite(value) and 0 <= value <= 10):
                raise UsageError(f"--{flag} {value}: give a relative σ in 0..10 (e.g. 0.02)")
        if self.adc_bound is not None and not (math.isfinite(self.adc_bound) and self.adc_bound > 0):
            raise UsageError(f"--adc-bound {self.adc_bound}: give a positive multiple of R·max|w|")
        if not 1 <= self.runs <= MAX_RUNS:
            raise UsageError(f"--runs {self.runs}: give 1..{MAX_RUNS} runs")

    @property
    def noiseless(self) -> bool:
        return self.weight_noise == 0 and self.output_noise == 0

    def to_dict(self) -> dict:
        return {
            "weight_noise": self.weight_noise,
            "dac_bits": self.dac_bits,
            "adc_bits": self.adc_bits,
            "output_noise": self.output_noise,
            "adc_range": "calibrated" if self.adc_bound is None else "bound",
            "adc_bound": self.adc_bound,
            "runs": self.runs,
            "seed": self.seed,
        }


def tile_bounds(rows: int, array_rows: int) -> list[tuple[int, int]]:
    """⌈rows/AR⌉ tiles of balanced sizes (the first ``rows mod tiles`` one row larger)."""
    count = -(-rows // array_rows)
    base, extra = divmod(rows, count)
    bounds, start = [], 0
    for index in range(count):
        stop = start + base + (index < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class AnalogLayer:
    """A node to run on crossbars: its weight as a cols × rows matrix, and how to put it back."""

    node: onnx.NodeProto
    matrix: np.ndarray  # cols × rows, float64
    shape: tuple[int, ...]  # the weight's ONNX shape
    transposed: bool  # the ONNX weight is rows × cols (MatMul, Gemm without transB)

    @property
    def data(self) -> str:
        return self.node.input[0]

    def weight(self, matrix: np.ndarray) -> np.ndarray:
        """A cols × rows matrix back in the ONNX weight's layout, float32."""
        values = matrix.T if self.transposed else matrix
        return np.ascontiguousarray(values.reshape(self.shape), dtype=np.float32)


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    attr = next((a for a in node.attribute if a.name == name), None)
    return default if attr is None else helper.get_attribute_value(attr)


def analog_layers(model: onnx.ModelProto) -> list[AnalogLayer]:
    """Conv, Gemm and MatMul nodes whose weight is a float32 initializer (MatMul: a 2-D second input)."""
    weights = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    layers = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        values = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        if node.op_type == "Conv" and values.ndim >= 3:
            layers.append(AnalogLayer(node, values.reshape(values.shape[0], -1), values.shape, False))
        elif node.op_type == "Gemm" and values.ndim == 2:
            values = values * _attr(node, "alpha", 1.0)
            transposed = not _attr(node, "transB", 0)
            layers.append(AnalogLayer(node, values.T if transposed else values, values.shape, transposed))
        elif node.op_type == "MatMul" and values.ndim == 2:
            layers.append(AnalogLayer(node, values.T, values.shape, True))
    return layers


def _constant(graph: onnx.GraphProto, name: str, value: np.ndarray | float, dtype=np.float32) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


def _quantize(graph: onnx.GraphProto, nodes: list, source: str, bound, bits: int, prefix: str) -> str:
    """round(clip(x, −B, B)/q)·q with q = B/(2^(bits−1) − 1); ``bound`` a scalar or per-column array."""
    bound = np.maximum(np.asarray(bound, dtype=np.float64), np.finfo(np.float32).tiny)
    step = bound / (2 ** (bits - 1) - 1)
    low, high, q = (
        _constant(graph, f"{prefix}_{k}", v) for k, v in (("lo", -bound), ("hi", bound), ("q", step))
    )
    nodes += [
        helper.make_node("Max", [source, low], [f"{prefix}_a"], name=f"{prefix}_max"),
        helper.make_node("Min", [f"{prefix}_a", high], [f"{prefix}_b"], name=f"{prefix}_min"),
        helper.make_node("Div", [f"{prefix}_b", q], [f"{prefix}_c"], name=f"{prefix}_div"),
        helper.make_node("Round", [f"{prefix}_c"], [f"{prefix}_d"], name=f"{prefix}_round"),
        helper.make_node("Mul", [f"{prefix}_d", q], [f"{prefix}_out"], name=f"{prefix}_mul"),
    ]
    return f"{prefix}_out"


def _bias(layer: AnalogLayer, graph: onnx.GraphProto, nodes: list, source: str, prefix: str) -> str:
    node = layer.node
    if len(node.input) < 3 or not node.input[2]:
        return source
    bias = node.input[2]
    if node.op_type == "Conv":
        spatial = len(layer.shape) - 2
        shape = _constant(graph, f"{prefix}_bshape", [1, -1] + [1] * spatial, np.int64)
        nodes.append(helper.make_node("Reshape", [bias, shape], [f"{prefix}_b"], name=f"{prefix}_bshape"))
        bias = f"{prefix}_b"
    elif (beta := _attr(node, "beta", 1.0)) != 1.0:
        beta_name = _constant(graph, f"{prefix}_beta", beta)
        nodes.append(helper.make_node("Mul", [bias, beta_name], [f"{prefix}_b"], name=f"{prefix}_beta"))
        bias = f"{prefix}_b"
    nodes.append(helper.make_node("Add", [source, bias], [f"{prefix}_biased"], name=f"{prefix}_bias"))
    return f"{prefix}_biased"


def _tile_node(layer: AnalogLayer, source: str, weight: str, output: str, name: str) -> onnx.NodeProto:
    node = layer.node
    if node.op_type == "MatMul":
        return helper.make_node("MatMul", [source, weight], [output], name=name)
    keep = [a for a in node.attribute if a.name not in ("alpha", "beta")]
    tile = helper.make_node(node.op_type, [source, weight], [output], name=name)
    tile.attribute.extend(keep)
    return tile


def _replace(
    layer: AnalogLayer,
    graph: onnx.GraphProto,
    input_range: float,
    settings: NoiseSettings,
    array_rows: int,
    rng: np.random.Generator,
    seed: int,
    adc_ranges: Mapping[str, float] | None,
) -> list[onnx.NodeProto]:
    prefix = f"imc_{layer.node.name or layer.node.output[0]}"
    nodes: list[onnx.NodeProto] = []
    source = layer.data
    if settings.dac_bits:
        source = _quantize(graph, nodes, source, input_range, settings.dac_bits, f"{prefix}_dac")
    partials = []
    for index, (start, stop) in enumerate(tile_bounds(layer.matrix.shape[1], array_rows)):
        tile = f"{prefix}_t{index}"
        clean = np.zeros_like(layer.matrix)
        clean[:, start:stop] = layer.matrix[:, start:stop]
        noisy = clean.copy()
        if settings.weight_noise:
            column_max = np.abs(clean[:, start:stop]).max(axis=1, keepdims=True)
            sigma = settings.weight_noise * column_max
            noisy[:, start:stop] += sigma * rng.standard_normal((clean.shape[0], stop - start))
        weight = _constant(graph, f"{tile}_w", layer.weight(noisy))
        nodes.append(_tile_node(layer, source, weight, f"{tile}_p", f"{tile}_mvm"))
        partial = f"{tile}_p"
        if settings.adc_bound is None:
            full_scale = adc_ranges.get(tile, 0.0) if adc_ranges is not None else 0.0
        else:
            full_scale = settings.adc_bound * input_range * float(np.abs(clean).max())
        if settings.output_noise:
            scale = settings.output_noise * full_scale
            noise = helper.make_node(
                "RandomNormalLike",
                [partial],
                [f"{tile}_n"],
                f"{tile}_noise",
                scale=scale,
                seed=float(seed + index),
            )
            nodes += [noise, helper.make_node("Add", [partial, f"{tile}_n"], [f"{tile}_pn"], f"{tile}_noisy")]
            partial = f"{tile}_pn"
        if settings.adc_bits:
            partial = _quantize(graph, nodes, partial, full_scale, settings.adc_bits, f"{tile}_adc")
        partials.append(partial)
    total = f"{prefix}_sum"
    nodes.append(helper.make_node("Sum", partials, [total], name=f"{prefix}_sum"))
    result = _bias(layer, graph, nodes, total, prefix)
    nodes.append(helper.make_node("Identity", [result], [layer.node.output[0]], name=f"{prefix}_out"))
    return nodes


def analog_model(
    model: onnx.ModelProto,
    ranges: Mapping[str, float],
    settings: NoiseSettings,
    array_rows: int,
    seed: int,
    adc_ranges: Mapping[str, float] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with every layer named in ``ranges`` (node name → input range R) on noisy
    crossbars; ``seed`` draws this run's programming and output noise. ``adc_ranges`` (tile → full scale,
    from `partial_sums`) is what a calibrated ADC (``settings.adc_bound`` None) uses."""
    if settings.adc_bound is None and (settings.adc_bits or settings.output_noise) and adc_ranges is None:
        raise ValueError("a calibrated ADC needs adc_ranges (measure them with partial_sums)")
    rng = np.random.default_rng(seed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    layers = {layer.node.name: layer for layer in analog_layers(copy) if layer.node.name in ranges}
    nodes = []
    for position, node in enumerate(graph.node):
        layer = layers.get(node.name)
        if layer is None:
            nodes.append(node)
            continue
        run_seed = (seed * 1_000_003 + position * 7_919) % 2**31
        nodes += _replace(layer, graph, ranges[node.name], settings, array_rows, rng, run_seed, adc_ranges)
    del graph.node[:]
    graph.node.extend(nodes)
    return copy


def partial_sums(analog: onnx.ModelProto) -> dict[str, str]:
    """Tile name → the tensor holding its partial sum (before noise and ADC), in an `analog_model`."""
    return {
        node.name.removesuffix("_mvm"): node.output[0]
        for node in analog.graph.node
        if node.name.endswith("_mvm")
    }
