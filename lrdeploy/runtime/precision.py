"""The deployed precision: float16 or int8 QDQ, applied after factorization with onnxruntime's own tools.

fp16 is onnxruntime's converter (`onnxruntime.transformers.float16`) with float32 inputs and outputs
kept and its default block list (ops that must stay float32); int8 is `onnxruntime.quantization`'s static
QDQ quantization with per-channel weights, its activation ranges calibrated on the ``calib`` samples
(read as `planning.calibration` reads them). Neither is written here: both are onnxruntime's.

int8 then has its biases corrected on the same samples (`lrdeploy.runtime.biascorrect`): a pair's rank-r
middle tensor is an extra int8 rounding whose error on image data is mostly a constant offset, which cost
the VGG at ``--rank-ratio 0.5`` 2 points; the correction cuts its output error by almost 2/3 (rel L2
0.050 → 0.018; models/RESULTS_precision.md, with the calibration methods, sample counts, symmetric ranges
and exclusions that did not remove it). It costs one run per layer, so models with more than
`biascorrect.MAX_LAYERS` (32) Conv/Gemm layers skip it. ``middle="int16"`` (``int8_middle``) also
keeps those middle tensors in 16 bits (opset 21 Q/DQ): closer still, but the pairs then run in float on
the CPU EP — a trade-off, not the default.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.errors import RuntimeFailure
from lrdeploy.io.modelio import choose_ir_version
from lrdeploy.runtime.datasets import ImageOptions, InMemoryData
from lrdeploy.runtime.sessions import require_onnxruntime

__all__ = ["MIDDLES", "convert", "middle_tensors", "to_fp16", "to_int8", "weight_bytes"]

#: How a factorized pair's rank-r middle tensor is quantized.
MIDDLES = ("int8", "int16")


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (weights, biases, scales), as stored."""
    total = 0
    for tensor in model.graph.initializer:
        count = int(np.prod(tensor.dims, dtype=np.int64))
        total += count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return total


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 weights and math, float32 inputs/outputs, onnxruntime's block list kept in float32."""
    require_onnxruntime()
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every value clipped to the float16 range
        converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    # it appends the input Casts after their readers: sort, as the checker requires
    graph = gs.import_onnx(converted).toposort()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ordered = gs.export_onnx(graph, do_type_check=False)
    del ordered.opset_import[:]
    ordered.opset_import.extend(converted.opset_import)
    ordered.ir_version = model.ir_version
    return ordered


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over our datasets: one batch per call."""

    def __init__(self, batches: Iterator[dict[str, np.ndarray]]) -> None:
        self._batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def middle_tensors(model: onnx.ModelProto) -> list[str]:
    """The rank-r tensors between the two nodes of each factorized pair."""
    return [n.output[0] for n in model.graph.node if "_lowrank_in" in n.name and n.output]


def to_int8(
    model: onnx.ModelProto,
    calib: str | InMemoryData,
    image: ImageOptions,
    samples: int,
    batch_size: int,
    *,
    correct_bias: bool = True,
    middle: str = "int8",
) -> onnx.ModelProto:
    """Static QDQ int8: per-channel int8 weights, int8 activations calibrated (MinMax) on ``calib``, then
    each Conv/Gemm bias corrected for the mean error its layer adds (``correct_bias``)."""
    require_onnxruntime()
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from lrdeploy.planning.calibration import calibration_dataset
    from lrdeploy.runtime.biascorrect import (
        MAX_LAYERS,
        SAMPLES,
        correct_biases,
        correctable,
        with_zero_biases,
    )

    if middle not in MIDDLES:
        raise ValueError(f"middle must be one of {MIDDLES}, got {middle!r}")
    dataset = calibration_dataset(calib, model, image, samples)
    correct_bias = correct_bias and correctable(model) <= MAX_LAYERS  # else no zero biases either
    source_model = with_zero_biases(model) if correct_bias else model
    extra: dict[str, object] = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if middle == "int16":
        wide = [{"quant_type": QuantType.QInt16}]
        extra["TensorQuantOverrides"] = {name: wide for name in middle_tensors(model)}
    with tempfile.TemporaryDirectory(prefix="lrdeploy-int8-") as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        onnx.save_model(source_model, source)
        try:
            with _quiet():
                quantize_static(
                    source,
                    target,
                    _Reader(iter(dataset.batches(batch_size))),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    extra_options=extra,
                )
            quantized = onnx.load_model(target)
            if correct_bias:
                batches = list(dataset.batches(batch_size, limit=SAMPLES))
                quantized, _ = correct_biases(source_model, quantized, batches)
        except Exception as error:  # onnxruntime's tool raises anything; say what in one line
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RuntimeFailure(f"int8 quantization failed: {message[:200]}") from None
    quantized.ir_version = choose_ir_version(model.ir_version, quantized)
    return quantized


@contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer logs advice ("consider pre-processing") on the root logger: not ours."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(previous)


def convert(model: onnx.ModelProto, config) -> onnx.ModelProto:
    """The model at ``config``'s deployed precision (unchanged for fp32)."""
    from lrdeploy.runtime.verification import _batch_size

    if config.precision == "fp16":
        return to_fp16(model)
    if config.quantize == "int8":
        batch = _batch_size(model, config.verification.batch_size)
        image, samples = config.verification.image, config.calib_samples
        return to_int8(model, config.calib, image, samples, batch, middle=config.int8_middle)
    return model
