"""Ops that hold a weight or cost MACs but have no low-rank pair: the reason the report gives for each.

Every such node gets a report row (`lrdeploy.planning.plan.find_groups`), so the rows account for every weight
and every multiply-accumulate that `lrdeploy.planning.costs` counts:

- Einsum, QLinearConv/QLinearMatMul, ConvInteger/MatMulInteger: with their constant operands.

Embeddings (Gather of a constant float table), LSTM/GRU/RNN and ConvTranspose have low-rank pairs
(`lowrank_embedding`, `lowrank_recurrent`, `lowrank_convtranspose`): their adapters say why when one
cannot be factorized (grouped ConvTranspose, a weight computed at run time, ...).

An activation×activation product (attention's Q·Kᵀ and attn·V) has no weight at all: `runtime_tensors`
tells the planner which operands depend on the graph's inputs, so those rows are marked as dynamic.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

__all__ = ["ACTIVATION_PRODUCT", "activation_product", "dense_row", "runtime_tensors"]

ACTIVATION_PRODUCT = "both operands are computed at run time (activation × activation, as in attention)"

_REASONS = {
    "Einsum": "Einsum is not factorized",
    "QLinearConv": "quantized (integer) layers are not factorized",
    "QLinearMatMul": "quantized (integer) layers are not factorized",
    "ConvInteger": "quantized (integer) layers are not factorized",
    "MatMulInteger": "quantized (integer) layers are not factorized",
}
_RANDOM = frozenset(("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"))


def _constants(node: gs.Node) -> list[gs.Constant]:
    seen: dict[int, gs.Constant] = {}
    for tensor in node.inputs:
        if isinstance(tensor, gs.Constant) and tensor.name:
            seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def dense_row(node: gs.Node) -> tuple[str, list[gs.Constant]] | None:
    """(reason, constant weights) for an op that holds weights or costs MACs without a low-rank pair."""
    if node.domain not in ("", "ai.onnx", None):
        return None
    if node.op in _REASONS:
        if node.op == "Einsum" and len(node.inputs) < 2:
            return None  # a transpose, trace or sum of one operand: no weight, no MACs
        return _REASONS[node.op], _constants(node)
    return None


def runtime_tensors(graph: gs.Graph) -> set[str]:
    """Names of the tensors whose values depend on the graph's inputs (or on randomness)."""
    runtime = {t.name for t in graph.inputs}
    changed = True
    while changed:  # graphs are usually sorted, so one more round confirms the first
        changed = False
        for node in graph.nodes:
            if node.outputs and node.outputs[0].name in runtime:
                continue
            subgraph = any(isinstance(v, gs.Graph) for v in node.attrs.values())
            if subgraph or node.op in _RANDOM or any(t.name in runtime for t in node.inputs if t.name):
                runtime.update(t.name for t in node.outputs)
                changed = True
    return runtime


def activation_product(node: gs.Node, runtime: set[str]) -> bool:
    """A MatMul/Gemm/Einsum whose operands are all computed from the inputs: there is no weight."""
    if node.op not in ("MatMul", "Gemm", "Einsum") or len(node.inputs) < 2:
        return False
    return all(t.name in runtime for t in node.inputs[:2])
