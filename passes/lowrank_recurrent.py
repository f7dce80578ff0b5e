"""The recurrent adapter: the input weights W of LSTM, GRU and RNN, shared by every direction.

W [dirs, gates·H, I] multiplies each time step's input x (I) for every gate and direction: stacked, it is
one [dirs·gates·H, I] matrix. With W ≈ A B (A [dirs·gates·H, r], B [r, I]) the pair is

    MatMul(X, Bᵀ [I, r])  →  LSTM/GRU/RNN(·, A as [dirs, gates·H, r], R, B, sequence_lens, initial states)

so one MatMul feeds both directions, and the recurrent op keeps every other input and attribute (direction,
layout — the MatMul acts on the last axis in both —, activations, clip, linear_before_reset, ...): exact
at full rank. The recurrent weights R [dirs, gates·H, H] stay dense: they act on the state, inside the
loop, and are not factorized. A step costs |A| + |R| MACs per sample, plus |B| in the MatMul.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.passes.lowrank_ops import LowRankOp, WeightView, why_not_weight
from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.values import read_values

__all__ = ["RECURRENT_OPS", "RecurrentOp"]

RECURRENT_OPS = ("LSTM", "GRU", "RNN")


class RecurrentOp(LowRankOp):
    def __init__(self, op: str) -> None:
        self.op = op

    def view(self, node: gs.Node) -> WeightView | str:
        if len(node.inputs) < 3:
            return f"{node.op} has no W and R inputs"
        if isinstance(node.inputs[0], gs.Constant):
            return "its input X is a constant"
        weight = node.inputs[1]
        reason = why_not_weight(weight)
        if reason:
            return reason
        shape = tuple(int(d) for d in weight.shape)
        if len(shape) != 3:
            return f"input weight W has shape {list(shape)}, not [directions, gates·H, input]"
        return WeightView(weight, shape[0] * shape[1], shape[2], (self.op, shape))

    def matrix(self, view):
        values = read_values(view.weight)
        return values.reshape(-1, values.shape[-1])

    def stored_factors(self, view, a, b):
        shape = view.layout[1]
        return b.T, a.reshape(shape[0], shape[1], a.shape[1])

    def product(self, view: WeightView, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b).reshape(view.layout[1])

    def kept_weights(self, node: gs.Node) -> list[gs.Constant]:
        """R, the biases, peepholes and constant initial states: they stay dense beside the pair."""
        seen: dict[int, gs.Constant] = {}
        for tensor in node.inputs[2:]:
            if isinstance(tensor, gs.Constant) and tensor.name and tensor is not node.inputs[1]:
                seen.setdefault(id(tensor), tensor)
        return list(seen.values())

    def emit(self, node, first, second, names: NameRegistry):
        x = node.inputs[0]
        hidden = gs.Variable(names.tensor(f"{node.name}_input_lowrank"), dtype=x.dtype)
        project = gs.Node("MatMul", names.node(f"{node.name}_lowrank_in"), {}, [x, first], [hidden])
        inputs = [hidden, second, *node.inputs[2:]]
        recurrent = gs.Node(
            node.op, names.node(f"{node.name}_lowrank_out"), dict(node.attrs), inputs, list(node.outputs)
        )
        return project, recurrent
