"""The embedding adapter: a constant table gathered by run-time ids (ALBERT's factorized embedding).

``Gather(E[V, d], ids, axis=0)`` is ``onehot(ids) @ E``: a MatMul whose inputs are the V one-hot rows,
so the weight as [outputs, inputs] is Eᵀ [d, V]. With Eᵀ ≈ A B (A d×r, B r×V) the pair is

    Gather(Bᵀ [V, r], ids, axis=0)  →  MatMul(·, Aᵀ [r, d])

exact at full rank for ids of any rank and negative ids (both Gathers read the same rows). A table that
is not float, not 2-D, or gathered by constant ids is not an embedding (None: no row of its own); one
gathered along another axis says why it stays dense. A table also read by anything but such a Gather
(an output projection tied to it) is left dense by the planner, so it stays shared.

Whitened: the second moment of one-hot rows is diag(token counts) / N, so data-aware factors weight each
row of E by how often its token occurs (`lrdeploy.planning.calibrate`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.passes.lowrank_ops import LowRankOp, WeightView, why_not_weight
from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.values import float_dtype, read_values

__all__ = ["EmbeddingOp", "embedding_table"]


def embedding_table(node: gs.Node) -> gs.Constant | None:
    """The node's table when it is a Gather of a constant float [V, d] table by run-time ids."""
    if node.op != "Gather" or len(node.inputs) != 2:
        return None
    table, ids = node.inputs
    if not isinstance(table, gs.Constant) or isinstance(ids, gs.Constant):
        return None
    if not float_dtype(table) or len(table.shape) != 2:
        return None
    return table


class EmbeddingOp(LowRankOp):
    op = "Gather"

    def view(self, node: gs.Node) -> WeightView | str | None:
        table = embedding_table(node)
        if table is None:
            return None
        axis = int(node.attrs.get("axis", 0))
        if axis not in (0, -2):
            return f"embedding gathered along axis {axis}: only row lookups (axis 0) are factorized"
        reason = why_not_weight(table)
        if reason:
            return reason
        vocab, dim = (int(d) for d in table.shape)
        return WeightView(table, dim, vocab, ("Gather",))

    def matrix(self, view):
        return read_values(view.weight).T

    def stored_factors(self, view, a, b):
        return b.T, a.T

    def product(self, view: WeightView, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b).T

    def emit(self, node, first, second, names: NameRegistry):
        out = node.outputs[0]
        hidden = gs.Variable(names.tensor(f"{out.name}_lowrank"), dtype=out.dtype)
        gather = gs.Node(
            "Gather", names.node(f"{node.name}_lowrank_in"), {"axis": 0}, [first, node.inputs[1]], [hidden]
        )
        matmul = gs.Node(
            "MatMul", names.node(f"{node.name}_lowrank_out"), {}, [hidden, second], list(node.outputs)
        )
        return gather, matmul
