"""The rows a layer multiplies, formed from its input in numpy (im2col of convs, pads as onnxruntime
resolves them, samples' axis of each op); `gramgraph` forms the same rows inside onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

__all__ = [
    "LAYERS_16",
    "MAX_EMBEDDING_ROWS",
    "LayerInput",
    "conv_pads",
    "conv_rows",
    "ints",
    "layer_input_16",
    "rows",
    "sample_axis",
]


def ints(attrs: Mapping[str, object], name: str, default: list[int]) -> list[int]:
    value = attrs.get(name)
    return [int(v) for v in value] if value is not None and len(value) else default  # type: ignore[arg-type]


def conv_pads(
    spatial: Sequence[int], attrs: Mapping[str, object], kernel_shape: Sequence[int]
) -> tuple[list[int], list[int]]:
    """(pads at the start, pads at the end) per spatial axis, as onnxruntime resolves auto_pad."""
    rank = len(kernel_shape)
    strides = ints(attrs, "strides", [1] * rank)
    dilations = ints(attrs, "dilations", [1] * rank)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, stride, dilation, k in zip(spatial, strides, dilations, kernel_shape, strict=True):
            out = -(-size // stride)
            needed = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - size)
            low = needed // 2 if auto_pad == "SAME_UPPER" else needed - needed // 2
            begin.append(low)
            end.append(needed - low)
        return begin, end
    if auto_pad == "VALID":
        return [0] * rank, [0] * rank
    pads = ints(attrs, "pads", [0] * 2 * rank)
    return pads[:rank], pads[rank:]


def conv_rows(x: np.ndarray, attrs: Mapping[str, object], kernel_shape: Sequence[int]) -> np.ndarray:
    """The im2col rows of a group-1 Conv on x [N, C, *spatial]: [N·Π out, C·Π k], one row per output
    position (sample-major, then output positions in C order), each row ordered (C, k₁, k₂, …)."""
    rank = len(kernel_shape)
    strides = ints(attrs, "strides", [1] * rank)
    dilations = ints(attrs, "dilations", [1] * rank)
    begin, end = conv_pads(x.shape[2:], attrs, kernel_shape)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begin, end, strict=True)])
    extent = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilations, strict=True)]
    axes = tuple(range(2, 2 + rank))
    windows = np.lib.stride_tricks.sliding_window_view(padded, extent, axis=axes)
    outer = (slice(None), slice(None), *(slice(None, None, s) for s in strides))
    inner = tuple(slice(None, None, d) for d in dilations)
    patches = windows[(*outer, *inner)]  # [N, C, *out, *k]
    order = (0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))
    channels_and_kernel = x.shape[1] * int(np.prod(kernel_shape))
    return patches.transpose(order).reshape(-1, channels_and_kernel)


@dataclass(frozen=True)
class LayerInput:
    """A factorizable node and how its input rows are formed (from `LayerInput.of` on the model)."""

    node: str
    tensor: str
    op: str
    dim: int
    attrs: Mapping[str, object] = field(default_factory=dict)
    kernel_shape: tuple[int, ...] = ()
    outputs: int = 0  # m: the weight's output channels/features

    @classmethod
    def of(
        cls,
        node: onnx.NodeProto,
        weights: Mapping[str, onnx.TensorProto],
        max_embedding_rows: int | None = None,
    ) -> LayerInput | None:
        """None for an embedding wider than ``max_embedding_rows`` (default `MAX_EMBEDDING_ROWS`)."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in LAYERS_16:
            return layer_input_16(node, attrs, weights, max_embedding_rows)
        weight = weights.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None:
            raise ValueError(f"node '{node.name}' has no constant weight")
        dims = tuple(weight.dims)
        if node.op_type == "Conv":
            if int(attrs.get("group", 1)) != 1:
                raise ValueError(f"node '{node.name}' is a grouped Conv")
            return cls(node.name, node.input[0], "Conv", int(np.prod(dims[1:])), attrs, dims[2:], dims[0])
        if node.op_type == "Gemm":
            inputs, outputs = (dims[1], dims[0]) if attrs.get("transB", 0) else (dims[0], dims[1])
            return cls(node.name, node.input[0], "Gemm", inputs, attrs, outputs=outputs)
        if node.op_type == "MatMul":
            return cls(node.name, node.input[0], "MatMul", dims[0], outputs=dims[-1])
        raise ValueError(f"node '{node.name}' is a {node.op_type}, not Conv/Gemm/MatMul")


def rows(layer: LayerInput, x: np.ndarray) -> np.ndarray:
    """The rows ``layer`` multiplies for its input x (conv: all of them; see `_add` for chunking)."""
    if layer.op == "Conv":
        return conv_rows(x, layer.attrs, layer.kernel_shape)
    if layer.op == "Gemm":
        return x.T if layer.attrs.get("transA", 0) else x
    if layer.op in LAYERS_16:
        return rows_16(layer, x)
    return x.reshape(-1, x.shape[-1])


# --- Embeddings, recurrent input weights, ConvTranspose (issue 16) ------------------------------------------

#: Ops whose rows `layer_input_16` defines.
LAYERS_16 = ("Gather", "LSTM", "GRU", "RNN", "ConvTranspose")
#: Embedding tables with more rows than this get no statistics (V×V accumulators): plain SVD factors.
MAX_EMBEDDING_ROWS = 4096


def layer_input_16(
    node: onnx.NodeProto,
    attrs: Mapping[str, object],
    weights: Mapping[str, onnx.TensorProto],
    max_embedding_rows: int | None = None,
) -> LayerInput | None:
    """The rows of an embedding (one-hot ids, width V; None above `MAX_EMBEDDING_ROWS`), of a recurrent
    op's input weight (each time step's x, width I) and of a ConvTranspose (each input pixel, width Cin)."""
    index = 0 if node.op_type == "Gather" else 1
    weight = weights.get(node.input[index]) if len(node.input) > index else None
    if weight is None:
        raise ValueError(f"node '{node.name}' has no constant weight")
    dims = tuple(weight.dims)
    if node.op_type == "Gather":
        if dims[0] > (MAX_EMBEDDING_ROWS if max_embedding_rows is None else max_embedding_rows):
            return None
        return LayerInput(node.name, node.input[1], "Gather", dims[0], attrs, outputs=dims[1])
    if node.op_type == "ConvTranspose":
        return LayerInput(node.name, node.input[0], "ConvTranspose", dims[0], attrs, dims[2:], dims[1])
    return LayerInput(node.name, node.input[0], node.op_type, dims[2], attrs, outputs=dims[0] * dims[1])


def rows_16(layer: LayerInput, x: np.ndarray) -> np.ndarray:
    if layer.op == "Gather":
        return np.eye(layer.dim)[np.asarray(x).reshape(-1) % layer.dim]
    if layer.op == "ConvTranspose":
        return np.moveaxis(x, 1, -1).reshape(-1, layer.dim)
    return x.reshape(-1, layer.dim)  # LSTM/GRU/RNN: every time step of every sequence, as the op reads X


def sample_axis(layer: LayerInput, x: np.ndarray) -> tuple[np.ndarray, int]:
    """x (a scalar or vector made 2-D where needed) and its samples' axis: Gemm with transA and
    time-major recurrent input (layout 0, [T, N, I]) have them on the second axis."""
    if (layer.op == "MatMul" and x.ndim == 1) or (layer.op == "Gather" and x.ndim == 0):
        return x.reshape(1, -1), 0
    if layer.op == "Gemm" and layer.attrs.get("transA", 0):
        return x, 1
    if layer.op in ("LSTM", "GRU", "RNN") and not layer.attrs.get("layout", 0):
        return x, 1
    return x, 0
