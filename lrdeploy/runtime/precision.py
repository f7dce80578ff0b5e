"""The deployed precision: float16 or int8 QDQ, applied after factorization with onnxruntime's own tools.

fp16 is onnxruntime's converter (`onnxruntime.transformers.float16`) with float32 inputs and outputs
kept and its default block list (ops that must stay float32); int8 is `onnxruntime.quantization`'s static
QDQ quantization with per-channel weights, its activation ranges calibrated on the ``calib`` samples
(read as `planning.calibration` reads them). Neither is written here: both are onnxruntime's.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.errors import RuntimeFailure
from lrdeploy.runtime.datasets import ImageOptions, InMemoryData
from lrdeploy.runtime.sessions import require_onnxruntime

__all__ = ["convert", "to_fp16", "to_int8", "weight_bytes"]


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


def to_int8(
    model: onnx.ModelProto,
    calib: str | InMemoryData,
    image: ImageOptions,
    samples: int,
    batch_size: int,
) -> onnx.ModelProto:
    """Static QDQ int8: per-channel int8 weights, int8 activations calibrated (MinMax) on ``calib``."""
    require_onnxruntime()
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from lrdeploy.planning.calibration import calibration_dataset

    dataset = calibration_dataset(calib, model, image, samples)
    with tempfile.TemporaryDirectory(prefix="lrdeploy-int8-") as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        onnx.save_model(model, source)
        try:
            quantize_static(
                source,
                target,
                _Reader(iter(dataset.batches(batch_size))),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        except Exception as error:  # onnxruntime's tool raises anything; say what in one line
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RuntimeFailure(f"int8 quantization failed: {message[:200]}") from None
        quantized = onnx.load_model(target)
    quantized.ir_version = model.ir_version
    return quantized


def convert(model: onnx.ModelProto, config) -> onnx.ModelProto:
    """The model at ``config``'s deployed precision (unchanged for fp32)."""
    from lrdeploy.runtime.verification import _batch_size

    if config.precision == "fp16":
        return to_fp16(model)
    if config.quantize == "int8":
        batch = _batch_size(model, config.verification.batch_size)
        return to_int8(model, config.calib, config.verification.image, config.calib_samples, batch)
    return model
