"""The transposed-convolution adapter (group 1): a 1×1 Conv to r channels, then the ConvTranspose.

ConvTranspose spreads each input pixel x (Cin) into a patch Wᵀx of Cout·Πk values, overlap-added at the
strides. W [Cin, Cout, k...] is therefore the [Cout·Πk, Cin] matrix (outputs per input pixel × inputs);
with it ≈ A B (A [Cout·Πk, r], B [r, Cin]) the pair is

    Conv(x, B as [r, Cin, 1...])  →  ConvTranspose(·, A as [r, Cout, k...], bias)

the second with every original attribute (strides, pads, output_padding, dilations, auto_pad,
output_shape, kernel_shape): exact at full rank, since the 1×1 Conv keeps the spatial grid. The other
split (a ConvTranspose Cin→r with the kernel, then a 1×1 Conv r→Cout) factors the [Cout, Cin·Πk] matrix
instead; `benchmarks/layers16.py` compares the two at the same parameters.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.passes.lowrank_ops import LowRankOp, WeightView, why_not_weight
from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.values import read_values

__all__ = ["ConvTransposeOp"]


class ConvTransposeOp(LowRankOp):
    op = "ConvTranspose"

    def view(self, node: gs.Node) -> WeightView | str:
        if len(node.inputs) < 2 or isinstance(node.inputs[0], gs.Constant):
            return "its input is a constant"
        weight = node.inputs[1]
        reason = why_not_weight(weight)
        if reason:
            return reason
        group = int(node.attrs.get("group", 1))
        if group != 1:
            return f"grouped transposed convolution (group={group}) is not factorized"
        shape = tuple(int(d) for d in weight.shape)
        if len(shape) < 3:
            return f"weight shape {list(shape)} is not [Cin, Cout, k...]"
        return WeightView(weight, int(np.prod(shape[1:])), shape[0], ("ConvTranspose", shape))

    def matrix(self, view):
        values = read_values(view.weight)
        return values.reshape(values.shape[0], -1).T

    def stored_factors(self, view, a, b):
        shape = view.layout[1]
        spatial = len(shape) - 2
        first = b.reshape(b.shape + (1,) * spatial)
        second = a.T.reshape((a.shape[1], *shape[1:]))
        return first, second

    def product(self, view: WeightView, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b).T.reshape(view.layout[1])

    def emit(self, node, first, second, names: NameRegistry):
        spatial = len(first.shape) - 2
        out = node.outputs[0]
        hidden = gs.Variable(names.tensor(f"{out.name}_lowrank"), dtype=out.dtype)
        reduce = gs.Node(
            "Conv",
            names.node(f"{node.name}_lowrank_in"),
            {"kernel_shape": [1] * spatial},
            [node.inputs[0], first],
            [hidden],
        )
        attrs = {k: v for k, v in node.attrs.items() if k != "group"}
        inputs = [hidden, second] + ([node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else [])
        spread = gs.Node(
            "ConvTranspose", names.node(f"{node.name}_lowrank_out"), attrs, inputs, list(node.outputs)
        )
        return reduce, spread
