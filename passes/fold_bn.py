"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul that feeds it.

BN computes ``y = s * (x - mean) + beta`` per channel (axis 1) with ``s = gamma / sqrt(var + eps)``,
i.e. ``y = s * x + t`` with ``t = beta - s * mean``. For a producer ``x = W ⊛ u + b`` whose output
channel c is produced by a slice of W:

    W_fused[c] = s[c] * W[c]          b_fused = s * b + t

- Conv: W is [Cout, Cin/g, k...]; output channel c is W[c] (any group count).
- ConvTranspose: W is [Cin, Cout/g, k...]; output channel g·(Cout/g) + j is W[g-th Cin block, j].
- Gemm ``alpha·A'·B' + beta·C`` (output [M, N], channels = N): scale the columns of B' and use
  ``C_fused = s·(beta·C) + t`` with beta = 1.
- MatMul with a constant 2-D right operand [K, N], optionally followed by Add of a constant bias, and a
  rank-2 output (BN's axis 1 is then the feature axis): scale the columns, fold into the bias (an Add
  is inserted when there was none).
- Conv/ConvTranspose followed by Add of a per-channel constant (a bias as converters sometimes write it):
  the constant joins the conv's bias first, then BN folds as above.

The fused weights are new tensors; a weight shared with other nodes is never changed in place. A BN is
left in place, with the reason recorded, when its parameters are not constant, it runs in training mode,
or its producer's output has another consumer or is a graph output. BNs inside If/Loop/Scan bodies fold
like the main graph's (a weight captured from an outer scope is scaled into a new tensor unless that body
node is its only reader).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.passes.names import NameRegistry
from lrdeploy.passes.result import PassResult
from lrdeploy.passes.scopes import all_graphs
from lrdeploy.passes.values import ScaledValues, float_dtype, read_values

__all__ = ["fold_batchnorm"]

_FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")


def _bn_affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (read_values(t).astype(np.float64) for t in bn.inputs[1:5])
    scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return scale, beta - scale * mean


def _exclusive(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return len(tensor.outputs) == 1 and all(tensor is not out for out in graph.outputs)


def _replace_input(node: gs.Node, index: int, constant: gs.Constant) -> None:
    if index < len(node.inputs):
        node.inputs[index] = constant
    else:
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(constant)


def _sole_reader(tensor: gs.Tensor, names: NameRegistry) -> bool:
    """True when the one node reading ``tensor`` may take its name: nothing else reads it, not even as
    a graph output (two tensors of one name would leave one of them unreachable)."""
    return len(tensor.outputs) == 1 and tensor.name not in names.graph_outputs


def _new_constant(old: gs.Tensor | None, values: np.ndarray, base: str, names: NameRegistry) -> gs.Constant:
    """A constant for fused values: it keeps the old name when nothing else reads the old tensor."""
    if isinstance(old, gs.Constant) and _sole_reader(old, names):
        return gs.Constant(old.name, values=np.array(values, order="C"))
    return gs.Constant(names.tensor(base), values=np.array(values, order="C"))


def _scaled_weight(
    weight: gs.Constant, multiplier: np.ndarray, base: str, names: NameRegistry
) -> gs.Constant:
    """The folded weight, computed from ``weight`` when read (see `ScaledValues`)."""
    name = weight.name if _sole_reader(weight, names) else names.tensor(base)
    return gs.Constant(name, values=ScaledValues(weight, multiplier))


def _float_constant(tensor: gs.Tensor | None) -> bool:
    return isinstance(tensor, gs.Constant) and float_dtype(tensor)


def _fold_conv(producer: gs.Node, scale: np.ndarray, shift: np.ndarray, names: NameRegistry) -> str | None:
    weight = producer.inputs[1]
    if not _float_constant(weight):
        return "the weight is not a constant float tensor"
    shape, dtype = tuple(weight.shape), np.dtype(weight.dtype)
    group = int(producer.attrs.get("group", 1))
    if producer.op == "Conv":
        if shape[0] != scale.size:
            return f"weight has {shape[0]} output channels but BN has {scale.size}"
        multiplier = scale.reshape((-1,) + (1,) * (len(shape) - 1))
    else:
        cin, cout_g = shape[0], shape[1]
        if cout_g * group != scale.size or cin % group:
            return f"weight {list(shape)} with group={group} does not match BN's {scale.size} channels"
        # Input channel i belongs to group i // (Cin/g); its output channel j is g·(Cout/g) + j.
        per_input = scale.reshape(group, 1, cout_g).repeat(cin // group, axis=1).reshape(cin, cout_g)
        multiplier = per_input.reshape((cin, cout_g) + (1,) * (len(shape) - 2))
    bias_tensor = producer.inputs[2] if len(producer.inputs) > 2 and producer.inputs[2].name else None
    if bias_tensor is not None and not _float_constant(bias_tensor):
        return "the bias is not a constant"
    bias = read_values(bias_tensor).astype(np.float64) if bias_tensor is not None else 0.0
    _replace_input(producer, 1, _scaled_weight(weight, multiplier, f"{producer.name}.weight", names))
    fused_bias = (scale * bias + shift).astype(dtype)
    _replace_input(producer, 2, _new_constant(bias_tensor, fused_bias, f"{producer.name}.bias", names))
    return None


def _fold_gemm(producer: gs.Node, scale: np.ndarray, shift: np.ndarray, names: NameRegistry) -> str | None:
    weight = producer.inputs[1]
    if not _float_constant(weight) or len(weight.shape) != 2:
        return "operand B is not a constant 2-D float tensor"
    shape, dtype = tuple(weight.shape), np.dtype(weight.dtype)
    trans_b = int(producer.attrs.get("transB", 0))
    if shape[0 if trans_b else 1] != scale.size:
        return f"Gemm has {shape[0 if trans_b else 1]} output features but BN has {scale.size} channels"
    multiplier = scale[:, None] if trans_b else scale[None, :]
    c_tensor = producer.inputs[2] if len(producer.inputs) > 2 and producer.inputs[2].name else None
    if c_tensor is not None and not _float_constant(c_tensor):
        return "operand C is not a constant"
    beta = float(producer.attrs.get("beta", 1.0))
    c = beta * read_values(c_tensor).astype(np.float64) if c_tensor is not None else np.zeros(scale.size)
    _replace_input(producer, 1, _scaled_weight(weight, multiplier, f"{producer.name}.weight", names))
    fused_c = (c * scale + shift).astype(dtype)
    _replace_input(producer, 2, _new_constant(c_tensor, fused_c, f"{producer.name}.bias", names))
    producer.attrs["beta"] = 1.0
    return None


def _matmul_weight(node: gs.Node) -> gs.Constant | None:
    weight = node.inputs[1] if len(node.inputs) == 2 else None
    if _float_constant(weight) and len(weight.shape) == 2 and not isinstance(node.inputs[0], gs.Constant):
        return weight
    return None


def _fold_matmul(
    graph: gs.Graph,
    producer: gs.Node,
    scale: np.ndarray,
    shift: np.ndarray,
    names: NameRegistry,
    tensor_ranks: Mapping[str, int],
) -> str | None:
    """Producer is a MatMul, or an Add(MatMul, bias) whose MatMul output feeds only that Add."""
    if producer.op == "Add":
        operands = list(producer.inputs)
        matmul_index = next(
            (i for i, t in enumerate(operands) if t.inputs and t.inputs[0].op == "MatMul"), None
        )
        if matmul_index is None or not isinstance(operands[1 - matmul_index], gs.Constant):
            return "the Add before it is not Conv/MatMul + constant bias"
        matmul, bias = operands[matmul_index].inputs[0], operands[1 - matmul_index]
        if not _exclusive(graph, operands[matmul_index]):
            return "the MatMul output has other consumers"
    else:
        matmul, bias = producer, None
    weight = _matmul_weight(matmul)
    if weight is None:
        return "the MatMul's right operand is not a constant 2-D float tensor"
    if tensor_ranks.get(matmul.outputs[0].name) != 2:
        return "the MatMul output is not known to be 2-D, so BN's channel axis may not be its feature axis"
    dtype = np.dtype(weight.dtype)
    if weight.shape[1] != scale.size:
        return f"MatMul has {weight.shape[1]} output features but BN has {scale.size} channels"
    if bias is not None and np.broadcast_shapes(tuple(bias.shape), (scale.size,)) != (scale.size,):
        return f"the bias shape {list(bias.shape)} is not per feature"
    matmul.inputs[1] = _scaled_weight(weight, scale[None, :], f"{matmul.name}.weight", names)
    old_bias = read_values(bias).astype(np.float64) if bias is not None else np.zeros(scale.size)
    fused_bias = (old_bias * scale + shift).astype(dtype)
    if bias is not None:
        producer.inputs[1 - matmul_index] = _new_constant(bias, fused_bias, f"{matmul.name}.bias", names)
        return None
    # No bias yet: insert Add(MatMul output, bias) in front of the BN's output.
    hidden = matmul.outputs[0]
    add_out = gs.Variable(names.tensor(f"{hidden.name}_bn_folded"), dtype=hidden.dtype)
    matmul.outputs[0] = add_out
    bias_const = gs.Constant(names.tensor(f"{matmul.name}.bias"), values=fused_bias)
    add = gs.Node(
        "Add", names.node(f"{matmul.name}.bias_add"), inputs=[add_out, bias_const], outputs=[hidden]
    )
    graph.nodes.insert(graph.nodes.index(matmul) + 1, add)
    return None


def _absorb_conv_bias_add(graph: gs.Graph, add: gs.Node, names: NameRegistry) -> gs.Node | None:
    """Conv → Add(per-channel constant), as some converters write a conv bias: move the constant into the
    Conv's bias and let the Conv write the Add's output. Returns the Conv, or None if the pattern is not
    there (then nothing changed)."""
    operands = list(add.inputs)
    index = next(
        (i for i, t in enumerate(operands) if t.inputs and t.inputs[0].op in ("Conv", "ConvTranspose")), None
    )
    if index is None or len(operands) != 2:
        return None
    conv_out, constant = operands[index], operands[1 - index]
    conv = conv_out.inputs[0]
    weight = conv.inputs[1] if len(conv.inputs) > 1 else None
    if not (_float_constant(constant) and _float_constant(weight) and _exclusive(graph, conv_out)):
        return None
    group = int(conv.attrs.get("group", 1))
    channels = weight.shape[0] if conv.op == "Conv" else weight.shape[1] * group
    rank = len(weight.shape)
    if len(constant.shape) > rank:
        return None
    shape = (1,) * (rank - len(constant.shape)) + tuple(constant.shape)
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    bias_tensor = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
    if bias_tensor is not None and not _float_constant(bias_tensor):
        return None
    added = np.broadcast_to(read_values(constant).astype(np.float64).reshape(-1), (channels,))
    bias = read_values(bias_tensor).astype(np.float64) if bias_tensor is not None else 0.0
    fused = (bias + added).astype(np.dtype(weight.dtype))
    _replace_input(conv, 2, _new_constant(bias_tensor, fused, f"{conv.name}.bias", names))
    out = add.outputs[0]
    add.inputs.clear()
    add.outputs.clear()
    conv.outputs[0] = out
    return conv


def _why_not_foldable(graph: gs.Graph, bn: gs.Node) -> str | None:
    if int(bn.attrs.get("training_mode", 0)):
        return "BatchNormalization runs in training mode"
    if any(t.outputs or t in graph.outputs for t in bn.outputs[1:]):
        return "its running statistics outputs are used"
    if len(bn.inputs) < 5 or not all(_float_constant(t) for t in bn.inputs[1:5]):
        return "its scale, bias, mean and variance are not all constant"
    x = bn.inputs[0]
    if not x.inputs or x.inputs[0].op not in _FOLDABLE:
        producer = x.inputs[0].op if x.inputs else "a graph input"
        return f"its input comes from {producer}, not Conv/ConvTranspose/Gemm/MatMul"
    if not _exclusive(graph, x):
        return "its producer's output is also used elsewhere"
    return None


def fold_batchnorm(
    graph: gs.Graph, names: NameRegistry, tensor_ranks: Mapping[str, int] | None = None
) -> PassResult:
    """Fold every foldable BatchNormalization; ``tensor_ranks`` (from shape inference) guards MatMul."""
    result = PassResult("fold_batchnorm")
    for body in all_graphs(graph):  # If/Loop/Scan bodies too: their BNs fold into their convs
        _fold_in(body, names, tensor_ranks or {}, result)
    graph.cleanup(remove_unused_graph_inputs=False)
    return result


def _fold_in(graph: gs.Graph, names: NameRegistry, ranks: Mapping[str, int], result: PassResult) -> None:
    """Fold the BNs of one graph (not of the bodies inside it)."""
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        reason = _why_not_foldable(graph, bn)
        producer = bn.inputs[0].inputs[0] if reason is None else None
        if producer is not None:
            scale, shift = _bn_affine(bn)
            if producer.op == "Add":
                producer = _absorb_conv_bias_add(graph, producer, names) or producer
            if producer.op in ("Conv", "ConvTranspose"):
                reason = _fold_conv(producer, scale, shift, names)
            elif producer.op == "Gemm":
                reason = _fold_gemm(producer, scale, shift, names)
            else:
                reason = _fold_matmul(graph, producer, scale, shift, names, ranks)
        if reason is not None:
            result.record(bn.name, bn.op, "skipped", reason)
            continue
        x, out = bn.inputs[0], bn.outputs[0]
        bn.inputs.clear()
        bn.outputs.clear()
        x.inputs[0].outputs[0] = out  # whatever now writes BN's input writes its output instead
        result.record(bn.name, bn.op, "folded", f"into {producer.op} '{producer.name}'", into=producer.name)
