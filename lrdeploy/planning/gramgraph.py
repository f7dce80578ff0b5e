"""Per-batch Grams computed inside onnxruntime: only d×d float32 products leave the session.

Copying every layer input out of onnxruntime (~1 GB per 32 ResNet-50 images) and multiplying it in numpy
cost more than the forward pass itself. Here the capture model gets, per layer and per part (fit /
held apart), nodes that form the rows and multiply them on onnxruntime's own threads:

- the part's samples: ``Gather(x, index, axis=0)``, the index an extra input fed per batch;
- rows, as a rows-major [N, P, D] (P rows per sample): Gemm/MatMul: every leading dimension flattened;
  Conv (2-D): im2col by one strided ``Slice`` per kernel tap of the padded NHWC input, concatenated so
  that columns are ordered (c, k₁, k₂) as the weight's;
- groups of at most `patchgram.CHUNK` rows ([G, K, D]): whole samples side by side when P is small (the
  batch padded with zero samples to G·g, G and g computed in the graph, so one session serves every
  batch size), a sample's rows split (zero-padded) when P is large — each float32 product sums ≤ CHUNK
  terms, and the G products are summed in float64 in numpy (`fold`);
- the symmetric product in b block rows, Rᵀ[i] · R[i:], about (b+1)/2b of the full product's MACs;
- stride-1 k×k convs of 16+ channels, by shifts (`patchgram`): F_Δ = Σ_{q ∈ image} x[q] x[q+Δ]ᵀ for
  half of the (2k−1)² offsets Δ (13 for 3×3) as one product [C, K] × [K, 13·C]; `fold_shifts` turns
  them into the Gram's blocks by subtracting, in numpy, the products over the thin border strips that
  a block's window leaves out (so the layer's input is also captured, for those strips).

Shapes other than the batch axis are static (from `onnx.shape_inference` on the fed shapes); a layer
whose shapes or element type are not known, or whose op does not fit one of the forms above, stays on
the numpy path (`calibrate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lrdeploy.planning import patchgram
from lrdeploy.planning.rowforms import conv_pads, ints

__all__ = ["GramPlan", "GraphBuilder", "fold", "fold_shifts", "order", "plan_layer"]

#: The shifted-product form needs an opset with Pad/Slice/ReduceSum taking inputs and int64 Max.
MIN_OPSET = 13
PARTS = ("fit", "holdout")


@dataclass
class GramPlan:
    """How one layer's Grams are computed in the graph and folded into its moments."""

    node: str
    tensor: str
    kind: str  # "sym" (upper block rows) or "shift" (F_Δ products, corrected in numpy)
    rows_per_sample: int
    dim: int
    blocks: list[int] = field(default_factory=list)  # sym: block-row starts, then dim
    outputs: dict[str, list[str]] = field(default_factory=dict)
    index: dict[str, str] = field(default_factory=dict)
    # Conv: static geometry
    channels: int = 0
    kernel: tuple[int, ...] = (1, 1)
    dilations: tuple[int, ...] = (1, 1)
    strides: tuple[int, ...] = (1, 1)
    begin: tuple[int, ...] = (0, 0)
    end: tuple[int, ...] = (0, 0)
    out_size: tuple[int, int] = (0, 0)
    spatial: tuple[int, int] = (0, 0)
    deltas: list[tuple[int, int]] = field(default_factory=list)


def plan_layer(
    node: str,
    op: str,
    tensor: str,
    dim: int,
    attrs: Mapping[str, object],
    kernel: Sequence[int],
    shape: Sequence[int] | None,
    shift_channels: int,
) -> GramPlan | None:
    """The in-graph plan for a layer whose input has ``shape`` (static but the batch axis), or None."""
    if shape is None or len(shape) < 2 or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
        return None
    if op in ("Gemm", "MatMul"):
        if (op == "Gemm" and (attrs.get("transA", 0) or len(shape) != 2)) or shape[-1] != dim:
            return None
        rows = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        return GramPlan(node, tensor, "sym", rows, dim, _blocks(dim))
    if op != "Conv" or len(shape) != 4 or len(kernel) != 2:
        return None
    channels, height, width = shape[1:]
    if channels * int(np.prod(kernel)) != dim:
        return None
    strides = ints(attrs, "strides", [1, 1])
    dilations = ints(attrs, "dilations", [1, 1])
    begin, end = conv_pads((height, width), attrs, kernel)
    out = [
        (size + b + e - (k - 1) * d - 1) // s + 1
        for size, b, e, k, d, s in zip((height, width), begin, end, kernel, dilations, strides, strict=True)
    ]
    if min(out) <= 0 or min(begin + end) < 0:
        return None
    plan = GramPlan(
        node,
        tensor,
        "sym",
        out[0] * out[1],
        dim,
        _blocks(dim),
        channels=channels,
        kernel=tuple(kernel),
        dilations=tuple(dilations),
        strides=tuple(strides),
        begin=tuple(begin),
        end=tuple(end),
        out_size=(out[0], out[1]),
        spatial=(height, width),
    )
    reach = [(k - 1) * d for k, d in zip(kernel, dilations, strict=True)]
    span = height * (width + 2 * reach[1])  # rows of one sample's shift products (`_shift`)
    shifts = strides == [1, 1] and int(np.prod(kernel)) > 1 and channels >= shift_channels
    if shifts and span <= patchgram.CHUNK:
        plan.kind = "shift"
        plan.deltas = [
            (dy, dx)
            for dy in range(0, reach[0] + 1, dilations[0])
            for dx in range(-reach[1], reach[1] + 1, dilations[1])
            if dy > 0 or dx >= 0
        ]
    return plan


def _blocks(dim: int) -> list[int]:
    """Block-row starts for the symmetric product: wide Grams in up to 4 block rows, then ``dim``."""
    count = max(1, min(4, dim // 256))
    size = -(-dim // count)
    return [*range(0, dim, size), dim]


class GraphBuilder:
    """Adds the Gram nodes of `GramPlan`s to a copy of the model (the input model is not changed)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.graph = self.model.graph
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"lrdeploy_gram_{self._count}_{hint}"

    def const(self, values: Sequence[int]) -> str:
        key = tuple(int(v) for v in values)
        if key not in self._consts:
            name = self._name("c")
            self.graph.initializer.append(numpy_helper.from_array(np.array(key, np.int64), name))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], **attrs: object) -> str:
        out = self._name(op_type.lower())
        self.graph.node.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def add(self, plan: GramPlan, parts: Sequence[str]) -> None:
        """Nodes for each part: Gather the part's samples, form the rows, output the products."""
        for part in parts:
            index = self._name(f"{part}_index")
            self.graph.input.append(helper.make_tensor_value_info(index, TensorProto.INT64, [f"{index}_n"]))
            x = self.op("Gather", [plan.tensor, index], axis=0)
            outputs = self._shift(plan, x) if plan.kind == "shift" else self._sym(plan, x)
            for name in outputs:
                self.graph.output.append(onnx.ValueInfoProto(name=name))
            plan.index[part], plan.outputs[part] = index, outputs

    def _columns(self, plan: GramPlan, x: str) -> str:
        """[N, D, P]: each sample's P rows as columns. Gemm/MatMul: every leading dimension flattened;
        Conv: the padded NCHW input's strided slice per kernel tap, concatenated on the channel axis
        (contiguous planes), so that D is tap-major (k, c) (`fold` reorders to the weight's (c, k))."""
        if not plan.channels:
            rows = self.op("Reshape", [x, self.const([-1, plan.rows_per_sample, plan.dim])])
            return self.op("Transpose", [rows], perm=[0, 2, 1])
        padded = any(plan.begin) or any(plan.end)
        if padded:
            x = self.op("Pad", [x, self.const([0, 0, *plan.begin, 0, 0, *plan.end])])
        taps = []
        for i in range(plan.kernel[0]):
            for j in range(plan.kernel[1]):
                start = (i * plan.dilations[0], j * plan.dilations[1])
                stop = [
                    s + (o - 1) * t + 1 for s, o, t in zip(start, plan.out_size, plan.strides, strict=True)
                ]
                bounds = [self.const(start), self.const(stop), self.const([2, 3]), self.const(plan.strides)]
                whole = not padded and (*start, *plan.strides, *stop) == (0, 0, 1, 1, *plan.spatial)
                taps.append(x if whole else self.op("Slice", [x, *bounds]))
        joined = taps[0] if len(taps) == 1 else self.op("Concat", taps, axis=1)
        return self.op("Reshape", [joined, self.const([-1, plan.dim, plan.rows_per_sample])])

    def _groups(self, columns: str, per_sample: int, width: int) -> str:
        """[N, D, P] → [G, D, K] with K ≤ CHUNK columns per group (zero samples or columns padded in)."""
        chunk = patchgram.CHUNK
        if per_sample > chunk:
            split = -(-per_sample // chunk)
            size = -(-per_sample // split)
            if split * size > per_sample:
                columns = self.op("Pad", [columns, self.const([0, 0, 0, 0, 0, split * size - per_sample])])
            parts = self.op("Reshape", [columns, self.const([-1, width, split, size])])
            swapped = self.op("Transpose", [parts], perm=[0, 2, 1, 3])
            return self.op("Reshape", [swapped, self.const([-1, width, size])])
        per_group = chunk // per_sample
        if per_group == 1:
            return columns
        padded, groups, size = self._pad_samples(columns, per_group)
        shape = self.op("Concat", [groups, size, self.const([width, per_sample])], axis=0)
        swapped = self.op("Transpose", [self.op("Reshape", [padded, shape])], perm=[0, 2, 1, 3])
        return self.op("Reshape", [swapped, self.const([0, width, -1])])

    def _pad_samples(self, tensor: str, per_group: int) -> tuple[str, str, str]:
        """A 3-D tensor with zero samples appended to G·g, and G = ⌈N/per_group⌉ (≥ 1), g = ⌈N/G⌉."""
        n = self.op("Gather", [self.op("Shape", [tensor]), self.const([0])], axis=0)
        one = self.const([1])
        ceiling = self.op("Div", [self.op("Add", [n, self.const([per_group - 1])]), self.const([per_group])])
        groups = self.op("Max", [ceiling, one])
        size = self.op("Div", [self.op("Sub", [self.op("Add", [n, groups]), one]), groups])
        missing = self.op("Sub", [self.op("Mul", [groups, size]), n])
        zeros = self.const([0, 0])
        pads = self.op("Concat", [self.const([0]), zeros, missing, zeros], axis=0)
        return self.op("Pad", [tensor, pads]), groups, size

    def _sym(self, plan: GramPlan, x: str) -> list[str]:
        """Products of the channel blocks i ≤ j (one Split: each copied once), [G, dᵢ, dⱼ] each."""
        columns = self._groups(self._columns(plan, x), plan.rows_per_sample, plan.dim)
        sizes = np.diff(plan.blocks).tolist()
        if len(sizes) == 1:
            chunks = [columns]
        else:
            split = self._name("split")
            chunks = [f"{split}_{i}" for i in range(len(sizes))]
            self.graph.node.append(
                helper.make_node("Split", [columns, self.const(sizes)], chunks, name=split, axis=1)
            )
        outputs = []
        for i, left in enumerate(chunks):
            for right in chunks[i:]:
                flipped = self.op("Transpose", [right], perm=[0, 2, 1])  # fused: FusedMatMul, transB
                outputs.append(self.op("MatMul", [left, flipped]))
        return outputs

    def _shift(self, plan: GramPlan, x: str) -> list[str]:
        """F_Δ = Σ_q x[q] x[q+Δ]ᵀ on the flattened padded image, where a shift by Δ is one by
        δ = Δ_y·W' + Δ_x (the padding of the columns keeps rows from wrapping): the rows of the image at
        full padded width against one contiguous slice per Δ, grouped once."""
        channels, (height, width) = plan.channels, plan.spatial
        reach = [(k - 1) * d for k, d in zip(plan.kernel, plan.dilations, strict=True)]
        wide = width + 2 * reach[1]
        span = height * wide  # the image's rows at full padded width
        flat_size = (height + 2 * reach[0]) * wide + reach[1]
        padded = self.op("Pad", [x, self.const([0, 0, *reach, 0, 0, *reach])])
        flat = self.op("Reshape", [padded, self.const([-1, channels, flat_size - reach[1]])])
        flat = self.op("Pad", [flat, self.const([0, 0, 0, 0, 0, reach[1]])])
        per_group = patchgram.CHUNK // span
        if per_group == 1:
            grouped = self.op("Unsqueeze", [flat, self.const([2])])  # [N, C, 1, flat]
        else:
            flat, groups, size = self._pad_samples(flat, per_group)
            shape = self.op("Concat", [groups, size, self.const([channels, flat_size])], axis=0)
            grouped = self.op("Transpose", [self.op("Reshape", [flat, shape])], perm=[0, 2, 1, 3])
        first = reach[0] * wide
        outputs = []
        left = self._flat_window(grouped, first, span, channels)
        for dy, dx in plan.deltas:
            start = first + dy * wide + dx
            right = self.op("Transpose", [self._flat_window(grouped, start, span, channels)], perm=[0, 2, 1])
            outputs.append(self.op("MatMul", [left, right]))
        return outputs

    def _flat_window(self, grouped: str, start: int, span: int, channels: int) -> str:
        window = self.op("Slice", [grouped, self.const([start]), self.const([start + span]), self.const([3])])
        return self.op("Reshape", [window, self.const([0, channels, -1])])


def order(plan: GramPlan) -> np.ndarray | None:
    """For an im2col conv plan: the tap-major index (k, c) of each weight column (c, k); else None."""
    taps = int(np.prod(plan.kernel))
    if plan.kind != "sym" or not plan.channels or taps == 1:
        return None
    return (np.arange(taps)[None, :] * plan.channels + np.arange(plan.channels)[:, None]).reshape(-1)


def _sum(products: np.ndarray) -> np.ndarray:
    if not np.isfinite(products).all():
        raise ValueError("the inputs hold NaN or infinite values")
    return products.sum(axis=0, dtype=np.float64)


def fold(plan: GramPlan, products: Sequence[np.ndarray], upper: np.ndarray) -> None:
    """upper[block i, block j ≥ i] += the summed float32 products of a "sym" plan (upper triangle
    meaningful)."""
    bounds = list(zip(plan.blocks[:-1], plan.blocks[1:], strict=True))
    pairs = [(i, j) for i in range(len(bounds)) for j in range(i, len(bounds))]
    for (i, j), product in zip(pairs, products, strict=True):
        upper[slice(*bounds[i]), slice(*bounds[j])] += _sum(product)


def fold_shifts(plan: GramPlan, product: Sequence[np.ndarray], x: np.ndarray, taps: np.ndarray) -> None:
    """taps (tap-major, blocks k ≤ k') += the Gram of a stride-1 conv's rows on the samples x, from the
    summed F_Δ products: block (k, k') = F_Δ − Σ over the image's positions outside block k's window."""
    channels, (height, width) = plan.channels, plan.spatial
    full = np.concatenate([_sum(p) for p in product], axis=1)
    reach = [(k - 1) * d for k, d in zip(plan.kernel, plan.dilations, strict=True)]
    padded = np.zeros((channels, x.shape[0], height + 2 * reach[0], width + 2 * reach[1]), np.float32)
    padded[:, :, reach[0] : reach[0] + height, reach[1] : reach[1] + width] = x.transpose(1, 0, 2, 3)
    image = (reach[0], reach[0] + height, reach[1], reach[1] + width)
    offsets = [
        (i * plan.dilations[0], j * plan.dilations[1])
        for i in range(plan.kernel[0])
        for j in range(plan.kernel[1])
    ]
    where = {delta: n for n, delta in enumerate(plan.deltas)}
    block = np.empty((channels, channels))
    for k, first in enumerate(offsets):
        top = reach[0] + first[0] - plan.begin[0]
        left = reach[1] + first[1] - plan.begin[1]
        window = (top, top + plan.out_size[0], left, left + plan.out_size[1])
        outside = _outside(image, window)
        for k2 in range(k, len(offsets)):
            delta = (offsets[k2][0] - first[0], offsets[k2][1] - first[1])
            if delta in where:
                n = where[delta]
                block[:] = full[:, n * channels : (n + 1) * channels]
            else:
                n = where[(-delta[0], -delta[1])]
                block[:] = full[:, n * channels : (n + 1) * channels].T
            for rect in outside:
                patchgram._rect_cross(padded, rect, delta, block, -1)
            taps[k * channels : (k + 1) * channels, k2 * channels : (k2 + 1) * channels] += block


def _outside(image: patchgram.Rect, window: patchgram.Rect) -> list[patchgram.Rect]:
    """image ∖ window as disjoint rects (top and bottom bands, then left and right in between)."""
    y0, y1, x0, x1 = image
    inner_y = (max(y0, window[0]), min(y1, window[1]))
    inner_x = (max(x0, window[2]), min(x1, window[3]))
    if inner_y[0] >= inner_y[1] or inner_x[0] >= inner_x[1]:
        return [image]
    pieces = [
        (y0, inner_y[0], x0, x1),
        (inner_y[1], y1, x0, x1),
        (*inner_y, x0, inner_x[0]),
        (*inner_y, inner_x[1], x1),
    ]
    return [r for r in pieces if r[1] > r[0] and r[3] > r[2]]
