"""Models with control flow, built inline: layers inside If/Loop/Scan bodies, as scripted exports write them.

- `audio_if_model`: a streaming-audio shape. A scalar int64 sample rate ``sr`` chooses between two
  branches (``sr == 16000`` → then); each runs Conv+BN → Relu → pool → a linear (Gemm, or MatMul) →
  Relu → MatMul with ``w_shared`` (one weight read by both branches), and updates a ``[2, batch, H]``
  recurrent state. The convolution weights are main-graph initializers captured from the outer scope.
- `loop_model`: a Loop whose body multiplies its carried state by an outer weight and a local one;
  with ``nested=True`` the body holds an If whose branches hold MatMuls too.
- `scan_model`: a Scan over time whose body is a two-MatMul cell.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from models import IR_VERSION, initializer

__all__ = ["H", "audio_if_model", "loop_model", "scan_model"]

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
H = 16  # state size
CHANNELS, TIME = 4, 20


def _value(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def weight(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """A weight whose singular values decay (0.6^i), as trained ones do: rank 1/2 keeps it close."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    u, _ = np.linalg.qr(rng.standard_normal((rows, min(rows, cols))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, min(rows, cols))))
    sigma = 0.6 ** np.arange(min(rows, cols)) * scale * np.sqrt(max(rows, cols))
    return ((u * sigma) @ v.T).reshape(shape).astype(np.float32)


def _bn(rng: np.random.Generator, prefix: str, channels: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_scale": (rng.random(channels) + 0.5).astype(np.float32),
        f"{prefix}_bias": (rng.standard_normal(channels) * 0.1).astype(np.float32),
        f"{prefix}_mean": (rng.standard_normal(channels) * 0.1).astype(np.float32),
        f"{prefix}_var": (rng.random(channels) + 0.5).astype(np.float32),
    }


def _branch(rng: np.random.Generator, tag: str, conv_weight: str, kernel: int, gemm: bool) -> onnx.GraphProto:
    """One branch: Conv(outer weight)+BN → Relu → mean over time → linear → Relu → MatMul(w_shared)."""
    bn = _bn(rng, f"{tag}_bn", 16)
    linear = weight(rng, 16, 48, scale=0.25)
    nodes = [
        helper.make_node("Conv", ["x", conv_weight], [f"{tag}_c"], f"{tag}_conv", pads=[kernel // 2] * 2),
        helper.make_node("BatchNormalization", [f"{tag}_c", *bn], [f"{tag}_n"], f"{tag}_bn"),
        helper.make_node("Relu", [f"{tag}_n"], [f"{tag}_r"], f"{tag}_relu"),
        helper.make_node("ReduceMean", [f"{tag}_r"], [f"{tag}_p"], f"{tag}_pool", axes=[2], keepdims=0),
        helper.make_node("Gemm", [f"{tag}_p", f"{tag}_w"], [f"{tag}_l"], f"{tag}_gemm")
        if gemm
        else helper.make_node("MatMul", [f"{tag}_p", f"{tag}_w"], [f"{tag}_l"], f"{tag}_matmul"),
        helper.make_node("Relu", [f"{tag}_l"], [f"{tag}_lr"], f"{tag}_relu2"),
        helper.make_node("MatMul", [f"{tag}_lr", "w_shared"], [f"{tag}_y"], f"{tag}_proj"),
        helper.make_node("Add", ["state", f"{tag}_y"], [f"{tag}_s"], f"{tag}_mix"),
        helper.make_node("Tanh", [f"{tag}_s"], [f"{tag}_state"], f"{tag}_tanh"),
    ]
    inits = [initializer(k, v) for k, v in bn.items()] + [initializer(f"{tag}_w", linear)]
    outputs = [_value(f"{tag}_y", FLOAT, None), _value(f"{tag}_state", FLOAT, None)]
    return helper.make_graph(nodes, f"{tag}_branch", [], outputs, inits)


def audio_if_model(seed: int = 0) -> onnx.ModelProto:
    """x [batch, 4, 20] float, sr [] int64, state [2, batch, 16] → y [batch, 16], state_out [2, batch, 16]."""
    rng = np.random.default_rng(seed)
    outer = {
        "w_conv16k": weight(rng, 16, CHANNELS, 3, scale=0.3),
        "w_conv8k": weight(rng, 16, CHANNELS, 5, scale=0.3),
        "w_shared": weight(rng, 48, H, scale=0.2),
        "sr16k": np.array(16000, dtype=np.int64),
    }
    then_branch = _branch(rng, "k16", "w_conv16k", 3, gemm=True)
    else_branch = _branch(rng, "k8", "w_conv8k", 5, gemm=False)
    nodes = [
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], "is16k"),
        helper.make_node(
            "If", ["is16k"], ["y", "state_out"], "If_0", then_branch=then_branch, else_branch=else_branch
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "audio",
        [
            _value("x", FLOAT, ["batch", CHANNELS, TIME]),
            _value("sr", INT64, []),
            _value("state", FLOAT, [2, "batch", H]),
        ],
        [_value("y", FLOAT, ["batch", H]), _value("state_out", FLOAT, [2, "batch", H])],
        [initializer(k, v) for k, v in outer.items()],
    )
    return _model(graph)


def _loop_body(rng: np.random.Generator, nested: bool) -> onnx.GraphProto:
    """(i, cond, h [1, 16]) → (cond, h'): h' = tanh(relu(h @ w_outer) @ w_local)."""
    nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"], "keep_going"),
        helper.make_node("MatMul", ["h", "w_outer"], ["a"], "up"),
        helper.make_node("Relu", ["a"], ["ar"], "relu"),
    ]
    inits = [initializer("w_local", weight(rng, 24 if nested else 40, H, scale=0.2))]
    if nested:
        branches = {}
        for tag in ("then", "else"):
            branch_w = weight(rng, 40, 24, scale=0.2)
            branches[f"{tag}_branch"] = helper.make_graph(
                [helper.make_node("MatMul", ["ar", f"w_{tag}"], [f"b_{tag}"], f"inner_{tag}")],
                f"inner_{tag}",
                [],
                [_value(f"b_{tag}", FLOAT, None)],
                [initializer(f"w_{tag}", branch_w)],
            )
        two = initializer("two", np.array(2, dtype=np.int64))
        zero = initializer("zero", np.array(0, dtype=np.int64))
        inits += [two, zero]
        nodes += [
            helper.make_node("Mod", ["i", "two"], ["parity"], "parity"),
            helper.make_node("Equal", ["parity", "zero"], ["even"], "even"),
            helper.make_node("If", ["even"], ["ab"], "If_inner", **branches),
            helper.make_node("MatMul", ["ab", "w_local"], ["b"], "down"),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["ar", "w_local"], ["b"], "down"))
    nodes.append(helper.make_node("Tanh", ["b"], ["h_next"], "tanh"))
    return helper.make_graph(
        nodes,
        "body",
        [_value("i", INT64, []), _value("cond_in", BOOL, []), _value("h", FLOAT, [1, H])],
        [_value("cond_out", BOOL, []), _value("h_next", FLOAT, [1, H])],
        inits,
    )


def loop_model(seed: int = 0, nested: bool = False) -> onnx.ModelProto:
    """h0 [1, 16] → h [1, 16] after 3 iterations of a body holding MatMuls (and an If when ``nested``)."""
    rng = np.random.default_rng(seed)
    outer = {
        "w_outer": weight(rng, H, 40, scale=0.3),
        "trips": np.array(3, dtype=np.int64),
        "go": np.array(True),
    }
    nodes = [
        helper.make_node("Loop", ["trips", "go", "h0"], ["h_final"], "Loop_0", body=_loop_body(rng, nested))
    ]
    graph = helper.make_graph(
        nodes,
        "loop",
        [_value("h0", FLOAT, [1, H])],
        [_value("h_final", FLOAT, [1, H])],
        [initializer(k, v) for k, v in outer.items()],
    )
    return _model(graph)


def scan_model(seed: int = 0) -> onnx.ModelProto:
    """xs [6, 8] scanned over its first axis with state s0 [16]: s' = tanh(relu(x_t @ w_in) @ w_out + s)."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "w_in"], ["a"], "cell_in"),
            helper.make_node("Relu", ["a"], ["ar"], "relu"),
            helper.make_node("MatMul", ["ar", "w_out"], ["b"], "cell_out"),
            helper.make_node("Add", ["b", "s"], ["c"], "mix"),
            helper.make_node("Tanh", ["c"], ["s_next"], "tanh"),
            helper.make_node("Identity", ["s_next"], ["y_t"], "emit"),
        ],
        "cell",
        [_value("s", FLOAT, [H]), _value("x_t", FLOAT, [8])],
        [_value("s_next", FLOAT, [H]), _value("y_t", FLOAT, [H])],
        [initializer("w_out", weight(rng, 40, H, scale=0.2))],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], "Scan_0", body=body, num_scan_inputs=1)],
        "scan",
        [_value("s0", FLOAT, [H]), _value("xs", FLOAT, [6, 8])],
        [_value("s_final", FLOAT, [H]), _value("ys", FLOAT, [6, H])],
        [initializer("w_in", weight(rng, 8, 40, scale=0.3))],
    )
    return _model(graph)
