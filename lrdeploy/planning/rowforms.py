"""The rows a layer multiplies, formed from its input in numpy (im2col of convs, pads as onnxruntime
resolves them, samples' axis of each op); `gramgraph` forms the same rows inside onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["conv_pads", "conv_rows", "ints"]


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
