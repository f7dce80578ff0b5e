"""Block low rank for Conv: one truncated SVD per group of channels, as two standard Conv nodes.

Two cases share this rewrite (``layout = ("GroupedConv", weight shape, G, split_outputs)``):

- group low rank (``--groups G`` on a group-1 Conv; Jeon, Rhe, Ko, DATE 2025): the weight
  [Cout, Cin·Πk] is split along its input channels into G blocks [Cout, (Cin/G)·Πk]; the second node
  is a dense 1×1 Conv (G·r → Cout) that sums the groups' contributions (``split_outputs`` False);
- a grouped Conv of the input model (1 < group < Cin): block g maps input channels g to output
  channels g, [Cout/G, (Cin/G)·Πk]; the second node is a grouped 1×1 Conv (group G, ``split_outputs``).

Both: the first node is a grouped k×k Conv (group G, G·r outputs) with the original strides, pads,
auto_pad and dilations; the second holds the bias. Each block is exact at full rank, so the pair is.

The view's ``m``×``n`` is one block and ``blocks`` is G: a rank is a rank per group, r·(m+n) < m·n is
still the test that a pair saves parameters, and the parameters are G times one block's.
The factors travel as A (m_total × G·r) and B (G·r × n_total) of the *stored* matrix (the group-1
Conv's [Cout, Cin·Πk], or the grouped Conv's [Cout, (Cin/G)·Πk]), zero outside the blocks, so that
A @ B is the approximation and the planner's error measures apply unchanged
(`lrdeploy.planning.blocks`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.passes.lowrank_ops import LowRankOp, WeightView, _hidden
from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.values import read_values

__all__ = ["GROUPED", "GroupedConvOp", "block_slices", "grouped_view", "with_groups"]

GROUPED = "GroupedConv"


def grouped_view(weight: gs.Constant, groups: int, split_outputs: bool) -> WeightView | str:
    """The view of a Conv weight [Cout, C, k...] as G blocks, or why it cannot be split."""
    shape = tuple(int(d) for d in weight.shape)
    if len(shape) < 3:
        return f"weight shape {list(shape)} is not [Cout, Cin, k...]"
    cout, channels, taps = shape[0], shape[1], math.prod(shape[2:])
    if split_outputs:  # a grouped conv: C = Cin/G already
        if cout % groups:
            return f"group {groups} does not divide the {cout} output channels"
        m, n = cout // groups, channels * taps
    else:
        if channels % groups:
            return f"groups {groups} does not divide its {channels} input channels; left dense"
        m, n = cout, channels // groups * taps
    return WeightView(weight, m, n, (GROUPED, shape, groups, split_outputs), blocks=groups)


def with_groups(view: WeightView, groups: int) -> WeightView | str | None:
    """A group-1 Conv's view as ``groups`` blocks (group low rank); None for other layers."""
    if view.layout[0] != "Conv" or groups <= 1:
        return None
    return grouped_view(view.weight, groups, split_outputs=False)


def block_slices(view: WeightView) -> list[tuple[slice, slice]]:
    """(rows, columns) of each block in the stored matrix."""
    groups, split = view.layout[2], view.layout[3]
    every = slice(None)
    if split:
        return [(slice(g * view.m, (g + 1) * view.m), every) for g in range(groups)]
    return [(every, slice(g * view.n, (g + 1) * view.n)) for g in range(groups)]


class GroupedConvOp(LowRankOp):
    op = GROUPED

    def view(self, node: gs.Node) -> WeightView | str:
        raise NotImplementedError("grouped views come from ConvOp.view or with_groups")

    def matrix(self, view):
        values = read_values(view.weight)
        return values.reshape(values.shape[0], -1)

    def stored_factors(self, view, a, b):
        """first [G·r, C/G, k...] (block g's B), second [Cout, r or G·r, 1...] (A's blocks)."""
        _, shape, groups, split = view.layout
        rank = b.shape[0] // groups
        blocks = block_slices(view)
        first = np.concatenate(
            [b[g * rank : (g + 1) * rank, cols] for g, (_, cols) in enumerate(blocks)], axis=0
        )
        spatial = (1,) * (len(shape) - 2)
        first = first.reshape((groups * rank, -1, *shape[2:]))
        if split:
            second = np.concatenate(
                [a[rows, g * rank : (g + 1) * rank] for g, (rows, _) in enumerate(blocks)], axis=0
            )
        else:
            second = a
        return first, second.reshape(second.shape + spatial)

    def emit(self, node, first, second, names: NameRegistry):
        spatial = len(first.shape) - 2
        split = int(node.attrs.get("group", 1)) > 1  # a grouped conv of the model: the second is grouped too
        in_channels = int(node.inputs[1].shape[1]) * int(node.attrs.get("group", 1))
        groups = in_channels // int(first.shape[1])
        hidden = _hidden(node, names)
        attrs = dict(node.attrs) | {"group": groups}
        first_node = gs.Node(
            "Conv", names.node(f"{node.name}_lowrank_in"), attrs, [node.inputs[0], first], [hidden]
        )
        second_attrs: dict[str, object] = (
            {"kernel_shape": [1] * spatial} if "kernel_shape" in node.attrs else {}
        )
        if split:
            second_attrs["group"] = groups
        bias = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else []
        inputs = [hidden, second, *bias]
        second_node = gs.Node(
            "Conv", names.node(f"{node.name}_lowrank_out"), second_attrs, inputs, list(node.outputs)
        )
        return first_node, second_node
