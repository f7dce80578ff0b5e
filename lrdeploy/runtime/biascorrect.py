"""Empirical bias correction of a static QDQ model (Nagel et al. 2019, "Data-free quantization", §4.2).

Rounding to an int8 grid is not zero-mean on real data: a value that recurs (an image's background, the
constant it makes in every channel of a pair's rank-r middle tensor) rounds the same way at every position
of every sample, and its error is a constant offset per channel that the next layers take for signal. With
``y`` a Conv/Gemm's output in the float model and ``y_q`` the same layer's output in the quantized one
(before its Q),

    δ_c = E[y_q]_c − E[y]_c        (mean over the samples and positions, per output channel c)

and ``b_q,c −= round(δ_c / s_c)`` (``s_c = s_x·s_w,c``, the int32 bias's scale) removes the offset. Layers
are corrected one at a time in graph order, each measured with the layers above it already corrected
(one run of the quantized model per layer, on at most `SAMPLES` samples: the means of a few dozen images'
positions are stable), so an offset that passes through a Relu is caught where it lands. Layers without
a bias get a zero one before quantization (`with_zero_biases`: r int32 values per pair) so that a pair's
first node is corrected too. On the VGG at ``--rank-ratio 0.5`` the offset was 2/3 of the int8 output
error (models/RESULTS_precision.md). Cost: one session and run per layer — 731 s against 16 s for the
quantization itself on ResNet-50 (108 layers, 16 images, loaded 2-core container) — so models with more
than `MAX_LAYERS` correctable layers are left uncorrected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["MAX_LAYERS", "SAMPLES", "correct_biases", "correctable", "with_zero_biases"]

#: Samples the correction runs on (one run of the quantized model per corrected layer).
SAMPLES = 64
#: Above this many correctable layers the correction (one run each) is skipped: too slow to be a default.
MAX_LAYERS = 32

_LAYERS = ("Conv", "Gemm")


def _channels(node: onnx.NodeProto, weight: onnx.TensorProto) -> int:
    if node.op_type == "Conv":
        return int(weight.dims[0])
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return int(weight.dims[0] if trans_b else weight.dims[1])


def correctable(model: onnx.ModelProto) -> int:
    """How many Conv/Gemm layers the correction would run once each for."""
    return sum(node.op_type in _LAYERS for node in model.graph.node)


def _bias_gain(node: onnx.NodeProto) -> float:
    """What one step of the int32 bias moves the output by, in units of its scale: Gemm scales C by beta."""
    if node.op_type != "Gemm":
        return 1.0
    return float(next((a.f for a in node.attribute if a.name == "beta"), 1.0))


def with_zero_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where every Conv/Gemm with a constant weight and no bias has a zero one."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        has_bias = len(node.input) > 2 and node.input[2]
        weight = weights.get(node.input[1]) if node.op_type in _LAYERS and len(node.input) > 1 else None
        if has_bias or weight is None or len(weight.dims) < 2:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(weight.data_type)
        name = f"{node.name or node.output[0]}_zero_bias"
        out.graph.initializer.append(numpy_helper.from_array(np.zeros(_channels(node, weight), dtype), name))
        del node.input[2:]
        node.input.append(name)
    return out


def _channel_means(
    model: onnx.ModelProto, names: Sequence[str], batches: Sequence[dict[str, np.ndarray]]
) -> list[np.ndarray]:
    """Per-channel (axis 1) means of the tensors ``names`` over every batch."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    sums: list[np.ndarray] = [np.zeros(0)] * len(names)
    counts = [0] * len(names)
    for batch in batches:
        for i, value in enumerate(session.run(None, batch)):
            total = value.astype(np.float64).sum(axis=tuple(k for k in range(value.ndim) if k != 1))
            sums[i] = total if counts[i] == 0 else sums[i] + total
            counts[i] += value.size // max(value.shape[1], 1)
    return [total / max(count, 1) for total, count in zip(sums, counts, strict=True)]


def _targets(float_model: onnx.ModelProto, quantized: onnx.ModelProto):
    """(node, its bias's DequantizeLinear, the float model's name for its output) per correctable layer."""
    producers = {o: n for n in quantized.graph.node for o in n.output}
    int32 = {t.name for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.INT32}
    float_nodes = {n.name: n for n in float_model.graph.node if n.name}
    for node in quantized.graph.node:
        twin = float_nodes.get(node.name)
        if node.op_type not in _LAYERS or twin is None or len(node.input) < 3:
            continue
        bias = producers.get(node.input[2])
        if bias is not None and bias.op_type == "DequantizeLinear" and bias.input[0] in int32:
            yield node, bias, twin.output[0]


def correct_biases(
    float_model: onnx.ModelProto, quantized: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]]
) -> tuple[onnx.ModelProto, int]:
    """``quantized`` with each Conv/Gemm's int32 bias shifted by its measured offset; and how many (0 when
    there are more than `MAX_LAYERS`)."""
    out = onnx.ModelProto()
    out.CopyFrom(quantized)
    targets = list(_targets(float_model, out))
    if not targets or len(targets) > MAX_LAYERS:
        return out, 0
    initializers = {t.name: t for t in out.graph.initializer}
    expected = _channel_means(float_model, [name for _, _, name in targets], batches)
    corrected = 0
    for (node, bias, _), want in zip(targets, expected, strict=True):
        (got,) = _channel_means(out, [node.output[0]], batches)
        stored = initializers[bias.input[0]]
        values = numpy_helper.to_array(stored)
        scale = numpy_helper.to_array(initializers[bias.input[1]]).astype(np.float64) * _bias_gain(node)
        if values.shape != got.shape or got.shape != want.shape or not np.all(scale):
            continue
        shifted = values.astype(np.int64) - np.round((got - want) / scale).astype(np.int64)
        limits = np.iinfo(np.int32)
        shifted = np.clip(shifted, limits.min, limits.max).astype(np.int32)
        stored.CopyFrom(numpy_helper.from_array(shifted, stored.name))
        corrected += 1
    return out, corrected
