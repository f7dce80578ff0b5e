"""Einsum as a linear layer: one input times one constant 2-D weight, as exporters write ``nn.Linear``.

An equation is a linear map when the weight's two labels are one input label ``i`` (in the input, summed
away) and one output label ``o`` (in the output, not the input), and every other input label passes
through to the output once: ``...i,io->...o``, ``bsi,oi->bso``, ``io,bi->bo``, ``bhsi,io->bhos``...
Then ``W`` seen as [outputs, inputs] is the weight, or its transpose, and the pair is two Einsums that
put a new rank label ``r`` where ``o`` was: ``X,ir->Y[o:=r]`` then ``Y[o:=r],ro->Y``. Anything else
(diagonals, batched weights, outer products, more operands) is reported with the reason.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.passes.lowrank_ops import LowRankOp, WeightView, _hidden, _why_not_weight
from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.values import read_values

__all__ = ["EinsumOp", "LinearEquation", "linear_equation"]

_ELLIPSIS = "."  # "..." is one term element here


@dataclass(frozen=True)
class LinearEquation:
    """``data_terms,weight_terms->output`` with the weight's input label ``i`` and output label ``o``."""

    data: tuple[str, ...]
    output: tuple[str, ...]
    label_in: str
    label_out: str
    weight_first: bool  # the constant is the first operand
    transposed: bool  # the weight is stored [o, i] (outputs first)

    def pair(self) -> tuple[str, str]:
        """The two equations of the factorized pair (data first in both)."""
        rank = next(c for c in string.ascii_letters if c not in {*self.data, *self.output})
        hidden = "".join(rank if t == self.label_out else _text(t) for t in self.output)
        data, output = "".join(map(_text, self.data)), "".join(map(_text, self.output))
        return f"{data},{self.label_in}{rank}->{hidden}", f"{hidden},{rank}{self.label_out}->{output}"


def _text(term: str) -> str:
    return "..." if term == _ELLIPSIS else term


def _terms(part: str) -> tuple[str, ...] | str:
    """Labels of one operand, with "..." as one element; a reason string when the part is malformed."""
    if part.count("...") > 1 or part.replace("...", "").count(".") or not part.replace("...", "").isalpha():
        return f"operand '{part}' is not letters with at most one '...'"
    head, _, tail = part.partition("...")
    return (*head, _ELLIPSIS, *tail) if "..." in part else tuple(part)


def linear_equation(equation: str, weight_index: int) -> LinearEquation | str:
    """The equation as a linear map of the non-constant operand, or the reason it is not one."""
    text = equation.replace(" ", "")
    lhs, arrow, rhs = text.partition("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return f"equation '{equation}' has {len(parts)} operands, not an input and a weight"
    parsed = [_terms(p) for p in parts]
    bad = next((p for p in parsed if isinstance(p, str)), None)
    if bad:
        return bad
    weight, data = parsed[weight_index], parsed[1 - weight_index]
    if arrow:
        output = _terms(rhs) if rhs else ()
        if isinstance(output, str):
            return output
    else:  # implicit output: the labels that appear once, sorted, after any "..."
        labels = [t for p in parsed for t in p if t != _ELLIPSIS]
        once = sorted((t for t in set(labels) if labels.count(t) == 1), key=lambda c: (c.islower(), c))
        output = ((_ELLIPSIS,) if _ELLIPSIS in data else ()) + tuple(once)
    assert not isinstance(weight, str) and not isinstance(data, str)
    if len(weight) != 2 or _ELLIPSIS in weight or weight[0] == weight[1]:
        return f"the constant operand's labels '{''.join(map(_text, weight))}' are not a matrix's two axes"
    if len(set(data)) != len(data) or len(set(output)) != len(output):
        return "a label repeats within an operand (a diagonal), not a linear layer"
    first, second = weight
    shared = [label for label in weight if label in data]
    if len(shared) != 1 or shared[0] in output:
        return "the weight does not contract exactly one input axis"
    label_in = shared[0]
    label_out = second if label_in == first else first
    if label_out not in output or set(output) != (set(data) - {label_in}) | {label_out}:
        return "the output is not the input's other axes plus the weight's output axis"
    return LinearEquation(data, output, label_in, label_out, weight_index == 0, label_out == first)


class EinsumOp(LowRankOp):
    """Einsum ``x·W`` (either operand order) with a constant 2-D float weight."""

    op = "Einsum"

    def view(self, node: gs.Node) -> WeightView | str | None:  # type: ignore[override]
        if len(node.inputs) < 2:
            return None  # a transpose, trace or sum of one operand: no weight, no MACs
        if len(node.inputs) > 2:
            return f"Einsum with {len(node.inputs)} operands is not factorized (only input × weight)"
        constant = [isinstance(t, gs.Constant) for t in node.inputs]
        if constant.count(True) != 1:
            return "Einsum is not factorized: it needs exactly one constant operand (the weight)"
        index = constant.index(True)
        weight = node.inputs[index]
        reason = _why_not_weight(weight)
        if reason:
            return reason
        equation = node.attrs.get("equation")
        if not isinstance(equation, str):
            return "Einsum has no equation"
        linear = linear_equation(equation, index)
        if isinstance(linear, str):
            return f"Einsum '{equation}' is not a linear layer: {linear}"
        if len(weight.shape) != 2:
            return f"the constant operand has shape {list(weight.shape)}, not 2-D"
        rows, cols = (int(d) for d in weight.shape)
        m, n = (rows, cols) if linear.transposed else (cols, rows)
        return WeightView(weight, m, n, ("Einsum", linear.transposed))

    def matrix(self, view: WeightView) -> np.ndarray:
        values = read_values(view.weight)
        return values if view.layout[1] else values.T

    def stored_factors(self, view: WeightView, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return b.T, a.T  # [inputs, r] then [r, outputs], whichever way the weight was stored

    def emit(
        self, node: gs.Node, first: gs.Constant, second: gs.Constant, names: NameRegistry
    ) -> tuple[gs.Node, gs.Node]:
        index = 0 if isinstance(node.inputs[0], gs.Constant) else 1
        linear = linear_equation(node.attrs["equation"], index)
        assert not isinstance(linear, str)
        into, out = linear.pair()
        hidden = _hidden(node, names)
        data = node.inputs[1 - index]
        first_node = gs.Node(
            "Einsum", names.node(f"{node.name}_lowrank_in"), {"equation": into}, [data, first], [hidden]
        )
        second_node = gs.Node(
            "Einsum",
            names.node(f"{node.name}_lowrank_out"),
            {"equation": out},
            [hidden, second],
            list(node.outputs),
        )
        return first_node, second_node
