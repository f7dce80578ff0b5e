"""One adapter per factorizable op: how its weight is an m×n matrix, and how the low-rank pair replaces it.

The matrix is always [outputs, inputs]: the factors A (m×r) and B (r×n) give ``W ≈ A B``, B runs first.

- Conv (group 1, any spatial rank): W [Cout, Cin, k...] is [Cout, Cin·Πk]. Pair: Conv(x, B as
  [r, Cin, k...]) with the original strides, pads, auto_pad, dilations and no bias, then a 1×1 Conv
  (A as [Cout, r, 1...]) with the original bias.
- Gemm ``alpha·A'·B' + beta·C`` with constant B: W = B'ᵀ is [N, K]. Pair: Gemm(A, B-factor, alpha, transA)
  then Gemm(h, A-factor, C, beta); both keep the original transB storage convention.
- Einsum ``x·W`` written as a linear layer (`lrdeploy.passes.lowrank_einsum`): two Einsums.
- MatMul(x, W [K, N]) with a constant 2-D right operand: W ᵀ is [N, K]. Pair: MatMul(x, Bᵀ) then
  MatMul(h, Aᵀ); a following bias Add is untouched.

``layout`` says which nodes may share one pair of factor tensors: same op and same storage convention.
Embeddings, recurrent input weights and ConvTranspose have their adapters in their own modules
(`lowrank_embedding`, `lowrank_recurrent`, `lowrank_convtranspose`), registered at the end of this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.normalize import WEIGHT_PATH_OPS
from lrdeploy.passes.values import float_dtype, read_values, type_name
from lrdeploy.spelling import either

__all__ = ["ADAPTERS", "LowRankOp", "WeightView", "weight_view"]


@dataclass(frozen=True)
class WeightView:
    """A node's constant weight seen as an [outputs, inputs] matrix."""

    weight: gs.Constant
    m: int
    n: int
    layout: tuple
    blocks: int = 1  # independent m×n blocks (`lrdeploy.passes.lowrank_grouped`); parameters m·n·blocks

    def matrix(self) -> np.ndarray:
        return ADAPTERS[self.layout[0]].matrix(self)


def _why_not_weight(tensor: gs.Tensor) -> str | None:
    if not isinstance(tensor, gs.Constant):
        node = tensor.inputs[0] if tensor.inputs else None
        producer = f" by {node.op} '{node.name}'" if node is not None else ""
        if node is not None and node.op in WEIGHT_PATH_OPS and _reads_only_constants(node):
            return (
                f"its weight is computed at run time{producer} from constants, left unfolded because "
                "another node reads the same constant as it is (a tied embedding, say) or the result is "
                "larger than its inputs"
            )
        if node is not None and node.op == "DequantizeLinear" and _reads_only_constants(node):
            return (
                f"its weight is quantized{producer}; pass {either('--requantize', 'requantize=True')} to "
                "factorize it and re-quantize the factors per channel"
            )
        return f"its weight is computed at run time{producer}, not a constant"
    if not float_dtype(tensor):
        return f"weight type {type_name(tensor)} is not float16/32/64"
    return None


def _reads_only_constants(node: gs.Node) -> bool:
    return bool(node.inputs) and all(isinstance(t, gs.Constant) for t in node.inputs if t.name)


def _variable_input(node: gs.Node) -> bool:
    return bool(node.inputs) and not isinstance(node.inputs[0], gs.Constant)


class LowRankOp:
    op: str

    def view(self, node: gs.Node) -> WeightView | str:
        """The weight view, or the reason this node cannot be factorized."""
        raise NotImplementedError

    def matrix(self, view: WeightView) -> np.ndarray:
        """The weight's values as the [outputs, inputs] matrix (a view where possible)."""
        raise NotImplementedError

    def stored_factors(self, view: WeightView, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first, second) weights as the two new nodes store them."""
        raise NotImplementedError

    def emit(
        self, node: gs.Node, first: gs.Constant, second: gs.Constant, names: NameRegistry
    ) -> tuple[gs.Node, gs.Node]:
        raise NotImplementedError

    def product(self, view: WeightView, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
        """A @ B in the weight's storage layout; None: the planner's default for Conv/Gemm/MatMul."""
        return None

    def kept_weights(self, node: gs.Node) -> list[gs.Constant]:
        """Other constant weights the factorized node keeps dense (a recurrent op's R), for the report."""
        return []


def _hidden(node: gs.Node, names: NameRegistry) -> gs.Variable:
    out = node.outputs[0]
    return gs.Variable(names.tensor(f"{out.name}_lowrank"), dtype=out.dtype)


class ConvOp(LowRankOp):
    op = "Conv"

    def view(self, node: gs.Node) -> WeightView | str:
        if len(node.inputs) < 2 or not _variable_input(node):
            return "its input is a constant"
        weight = node.inputs[1]
        reason = _why_not_weight(weight)
        if reason:
            return reason
        group = int(node.attrs.get("group", 1))
        shape = tuple(weight.shape)
        if group < 1:
            return f"group={group} is not a positive group count (the model is invalid)"
        if group != 1:
            if len(shape) >= 3 and shape[1] == 1:
                return (
                    f"depthwise convolution (group={group}): nothing to gain, each filter reads one channel"
                )
            from lrdeploy.passes.lowrank_grouped import grouped_view

            return grouped_view(weight, group, split_outputs=True)
        if len(shape) < 3:
            return f"weight shape {list(shape)} is not [Cout, Cin, k...]"
        return WeightView(weight, shape[0], int(np.prod(shape[1:])), ("Conv", shape))

    def matrix(self, view):
        values = read_values(view.weight)
        return values.reshape(values.shape[0], -1)

    def stored_factors(self, view, a, b):
        shape = view.layout[1]
        spatial = len(shape) - 2
        first = b.reshape((b.shape[0], *shape[1:]))
        second = a.reshape(a.shape + (1,) * spatial)
        return first, second

    def emit(self, node, first, second, names):
        spatial = len(first.shape) - 2
        hidden = _hidden(node, names)
        attrs = {k: v for k, v in node.attrs.items() if k != "group"}
        first_node = gs.Node(
            "Conv", names.node(f"{node.name}_lowrank_in"), attrs, [node.inputs[0], first], [hidden]
        )
        second_attrs = {"kernel_shape": [1] * spatial} if "kernel_shape" in node.attrs else {}
        inputs = [hidden, second] + ([node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2].name else [])
        second_node = gs.Node(
            "Conv", names.node(f"{node.name}_lowrank_out"), second_attrs, inputs, list(node.outputs)
        )
        return first_node, second_node


class GemmOp(LowRankOp):
    op = "Gemm"

    def view(self, node: gs.Node) -> WeightView | str:
        if len(node.inputs) < 2 or not _variable_input(node):
            return "operand A is a constant"
        weight = node.inputs[1]
        reason = _why_not_weight(weight)
        if reason:
            return reason
        if len(weight.shape) != 2:
            return f"operand B has shape {list(weight.shape)}, not 2-D"
        trans_b = int(node.attrs.get("transB", 0))
        n_out, k_in = (weight.shape[0], weight.shape[1]) if trans_b else (weight.shape[1], weight.shape[0])
        return WeightView(weight, int(n_out), int(k_in), ("Gemm", trans_b))

    def matrix(self, view):
        values = read_values(view.weight)
        return values if view.layout[1] else values.T

    def stored_factors(self, view, a, b):
        trans_b = view.layout[1]
        return (b, a) if trans_b else (b.T, a.T)

    def emit(self, node, first, second, names):
        attrs = node.attrs
        trans_b = int(attrs.get("transB", 0))
        hidden = _hidden(node, names)
        first_attrs = {
            "alpha": float(attrs.get("alpha", 1.0)),
            "transA": int(attrs.get("transA", 0)),
            "transB": trans_b,
        }
        first_node = gs.Node(
            "Gemm", names.node(f"{node.name}_lowrank_in"), first_attrs, [node.inputs[0], first], [hidden]
        )
        has_c = len(node.inputs) > 2 and node.inputs[2].name
        second_attrs = {"transB": trans_b}
        inputs = [hidden, second]
        if has_c:
            second_attrs["beta"] = float(attrs.get("beta", 1.0))
            inputs.append(node.inputs[2])
        second_node = gs.Node(
            "Gemm", names.node(f"{node.name}_lowrank_out"), second_attrs, inputs, list(node.outputs)
        )
        return first_node, second_node


class MatMulOp(LowRankOp):
    op = "MatMul"

    def view(self, node: gs.Node) -> WeightView | str:
        if len(node.inputs) != 2:
            return "MatMul does not have two inputs"
        left, weight = node.inputs
        if isinstance(left, gs.Constant):
            return "its left operand is a constant (only x @ W is factorized)"
        reason = _why_not_weight(weight)
        if reason:
            return reason
        if len(weight.shape) != 2:
            return f"the constant operand has shape {list(weight.shape)}, not 2-D"
        return WeightView(weight, int(weight.shape[1]), int(weight.shape[0]), ("MatMul",))

    def matrix(self, view):
        return read_values(view.weight).T

    def stored_factors(self, view, a, b):
        return b.T, a.T

    def emit(self, node, first, second, names):
        hidden = _hidden(node, names)
        first_node = gs.Node(
            "MatMul", names.node(f"{node.name}_lowrank_in"), {}, [node.inputs[0], first], [hidden]
        )
        second_node = gs.Node(
            "MatMul", names.node(f"{node.name}_lowrank_out"), {}, [hidden, second], list(node.outputs)
        )
        return first_node, second_node


ADAPTERS: dict[str, LowRankOp] = {op.op: op for op in (ConvOp(), GemmOp(), MatMulOp())}
why_not_weight = _why_not_weight  # for the adapters in their own modules

from lrdeploy.passes.lowrank_layers import LAYER_ADAPTERS  # noqa: E402  (they build on the classes above)

ADAPTERS.update(LAYER_ADAPTERS)


def _register_grouped() -> None:
    """Block low rank (grouped convs, --groups) is keyed by its layout, not by an op of its own."""
    from lrdeploy.passes.lowrank_grouped import GroupedConvOp

    ADAPTERS[GroupedConvOp.op] = GroupedConvOp()


_register_grouped()

from lrdeploy.passes.lowrank_einsum import EinsumOp  # noqa: E402  (it builds on the classes above)

ADAPTERS["Einsum"] = EinsumOp()


def weight_view(node: gs.Node) -> WeightView | str | None:
    """The node's weight view, the reason it is not factorizable, or None for other op types."""
    adapter = ADAPTERS.get(node.op)
    if adapter is None or node.domain not in ("", "ai.onnx", None):
        return None
    return adapter.view(node)
