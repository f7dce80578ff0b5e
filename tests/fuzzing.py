"""The fuzzer's parts (issue 12): valid small models, hypothesis mutations of them, and the property.

A mutation edits the protobuf the way a broken exporter or a hostile file would: attribute values, dims,
element types, payload sizes, node order, tensor names, op types, opset and IR versions. The property
(`check_outcome`): compressing the mutated file either fails with an `LrdeployError` whose message is one
line (and not an "internal error"), or writes a model that passes ``check_model(full_check=True)`` — or,
when the input fails that check too, one whose report says so in a note — and loads in onnxruntime
whenever the input does; the input file is never modified. `tests/test_fuzz.py` runs it seeded and bounded,
`benchmarks/fuzz.py` for as long as asked.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import lrdeploy
from lrdeploy.errors import LrdeployError
from models import session

__all__ = ["BASES", "check_outcome", "fuzz_cases", "mutate"]

FLOAT = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "fuzz",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _conv_bn() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = {
        "W": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "g": np.ones(8, np.float32),
        "b": np.zeros(8, np.float32),
        "m": rng.standard_normal(8).astype(np.float32),
        "v": np.ones(8, np.float32),
        "G": rng.standard_normal((10, 8)).astype(np.float32),
        "C": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "G", "C"], ["y"], name="fc", transB=1, alpha=1.0),
    ]
    return _model(nodes, [("x", FLOAT, ["N", 3, 8, 8])], [("y", FLOAT, ["N", 10])], inits)


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    inits = {
        "W1": rng.standard_normal((16, 12)).astype(np.float32),
        "b1": np.zeros(12, np.float32),
        "W2": rng.standard_normal((12, 6)).astype(np.float32),
        "shape": np.array([-1, 16], np.int64),
    }
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["x2"], name="reshape"),
        helper.make_node("MatMul", ["x2", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
    ]
    return _model(nodes, [("x", FLOAT, ["N", 16])], [("y", FLOAT, ["N", 6])], inits)


def _einsum() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = {"W": rng.standard_normal((12, 16)).astype(np.float32)}
    nodes = [helper.make_node("Einsum", ["x", "W"], ["y"], name="linear", equation="bsi,oi->bso")]
    return _model(nodes, [("x", FLOAT, ["N", 4, 16])], [("y", FLOAT, ["N", 4, 12])], inits)


def _fp16_cast() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    inits = {"W16": rng.standard_normal((16, 16)).astype(np.float16)}
    nodes = [
        helper.make_node("Cast", ["W16"], ["W"], name="cast", to=FLOAT),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="fc"),
    ]
    return _model(nodes, [("x", FLOAT, ["N", 16])], [("y", FLOAT, ["N", 16])], inits)


def _qdq() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    inits = {
        "Wq": rng.integers(-127, 128, (16, 12)).astype(np.int8),
        "s": np.full(12, 0.01, np.float32),
        "z": np.zeros(12, np.int8),
    }
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"], name="dq", axis=1),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="fc"),
    ]
    return _model(nodes, [("x", FLOAT, ["N", 16])], [("y", FLOAT, ["N", 12])], inits)


BASES = {"conv_bn": _conv_bn, "mlp": _mlp, "einsum": _einsum, "fp16_cast": _fp16_cast, "qdq": _qdq}

_ATTR_NAMES = ("group", "axis", "transA", "transB", "pads", "strides", "dilations", "kernel_shape", "alpha")
_ATTR_NAMES += ("beta", "epsilon", "equation", "to", "perm", "auto_pad", "block_size")
_OPS = ("Conv", "Gemm", "MatMul", "Einsum", "Cast", "DequantizeLinear", "Identity", "Loop", "If", "Transpose")
_TYPES = tuple(v for v in TensorProto.DataType.values() if v != TensorProto.UNDEFINED)
_NAMES = st.sampled_from(["", "x", "y", "W", "missing", "h", "W1", "r", "c", "s", "x2", "y"])

_ints = st.one_of(st.integers(-4, 12), st.sampled_from([0, 2**31, -(2**31), 2**62, -(2**63)]))
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
_values = st.one_of(
    _ints,
    _floats,
    st.lists(_ints, max_size=8),
    st.lists(_floats, max_size=4),
    st.text(alphabet="abcijo.,->… ", max_size=14),
)

_mutations = st.one_of(
    st.tuples(st.just("attr"), st.integers(0, 9), st.sampled_from(_ATTR_NAMES), _values),
    st.tuples(st.just("dims"), st.integers(0, 9), st.lists(st.integers(-2, 40), max_size=5)),
    st.tuples(st.just("dtype"), st.integers(0, 9), st.sampled_from(_TYPES)),
    st.tuples(st.just("payload"), st.integers(0, 9), st.integers(-64, 64)),
    st.tuples(st.just("input_dims"), st.lists(st.one_of(st.integers(-1, 9), st.just("N")), max_size=5)),
    st.tuples(st.just("input_type"), st.sampled_from(_TYPES)),
    st.tuples(st.just("shuffle"), st.lists(st.integers(0, 99), min_size=10, max_size=10)),
    st.tuples(st.just("rename_in"), st.integers(0, 9), st.integers(0, 4), _NAMES),
    st.tuples(st.just("rename_out"), st.integers(0, 9), _NAMES),
    st.tuples(st.just("node_name"), st.integers(0, 9), _NAMES),
    st.tuples(st.just("op"), st.integers(0, 9), st.sampled_from(_OPS)),
    st.tuples(st.just("opset"), st.integers(1, 26)),
    st.tuples(st.just("ir"), st.integers(0, 14)),
    st.tuples(st.just("drop_init"), st.integers(0, 9)),
    st.tuples(st.just("drop_node"), st.integers(0, 9)),
)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for index, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[index]
            break
    if isinstance(value, list) and value and isinstance(value[0], float):
        node.attribute.append(helper.make_attribute(name, value, attr_type=onnx.AttributeProto.FLOATS))
    elif isinstance(value, list):
        node.attribute.append(helper.make_attribute(name, value, attr_type=onnx.AttributeProto.INTS))
    else:
        node.attribute.append(helper.make_attribute(name, value))


def mutate(model: onnx.ModelProto, mutations: list[tuple]) -> onnx.ModelProto:
    """A mutated copy of ``model`` (indices wrap around; mutations that do not apply are skipped)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for kind, *args in mutations:
        nodes, inits = graph.node, graph.initializer
        if kind == "attr" and nodes:
            _set_attr(nodes[args[0] % len(nodes)], args[1], args[2])
        elif kind == "dims" and inits:
            tensor = inits[args[0] % len(inits)]
            del tensor.dims[:]
            tensor.dims.extend(args[1])
        elif kind == "dtype" and inits:
            inits[args[0] % len(inits)].data_type = args[1]
        elif kind == "payload" and inits:
            tensor = inits[args[0] % len(inits)]
            tensor.raw_data = (
                tensor.raw_data[: args[1]] if args[1] < 0 else tensor.raw_data + b"\x7f" * args[1]
            )
        elif kind == "input_dims":
            shape = graph.input[0].type.tensor_type.shape
            del shape.dim[:]
            for dim in args[0]:
                entry = shape.dim.add()
                if isinstance(dim, str):
                    entry.dim_param = dim
                else:
                    entry.dim_value = dim
        elif kind == "input_type":
            graph.input[0].type.tensor_type.elem_type = args[0]
        elif kind == "shuffle":
            order = [n for _, n in sorted(zip(args[0], nodes, strict=False), key=lambda p: p[0])]
            order += list(nodes)[len(order) :]
            copies = [onnx.NodeProto() for _ in order]
            for copy, node in zip(copies, order, strict=True):
                copy.CopyFrom(node)
            del graph.node[:]
            graph.node.extend(copies)
        elif kind == "rename_in" and nodes:
            node = nodes[args[0] % len(nodes)]
            if node.input:
                node.input[args[1] % len(node.input)] = args[2]
        elif kind == "rename_out" and nodes:
            node = nodes[args[0] % len(nodes)]
            node.output[0] = args[1]
        elif kind == "node_name" and nodes:
            nodes[args[0] % len(nodes)].name = args[1]
        elif kind == "op" and nodes:
            nodes[args[0] % len(nodes)].op_type = args[1]
        elif kind == "opset":
            out.opset_import[0].version = args[0]
        elif kind == "ir":
            out.ir_version = args[0]
        elif kind == "drop_init" and inits:
            del inits[args[0] % len(inits)]
        elif kind == "drop_node" and len(nodes) > 1:
            del nodes[args[0] % len(nodes)]
    return out


def _case(drawn: tuple) -> tuple:
    base, mutations, policy, requantize, verify = drawn
    model = mutate(BASES[base](), mutations)
    return base, mutations, model.SerializeToString(), {**policy, "requantize": requantize, "verify": verify}


_POLICIES = [{"rank_ratio": 0.5}, {"rank_ratio": 1.0}, {"rank": 2}, {"target_params": 0.6}]


def fuzz_cases() -> st.SearchStrategy[tuple]:
    """(base name, mutations, mutated model bytes, compress options)."""
    return st.tuples(
        st.sampled_from(sorted(BASES)),
        st.lists(_mutations, min_size=1, max_size=4),
        st.sampled_from(_POLICIES),
        st.booleans(),
        st.booleans(),
    ).map(_case)


def _checked(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception:
        return False
    return True


def _loads(path: Path) -> bool:
    try:
        session(path)
    except Exception:
        return False
    return True


def check_outcome(data: bytes, options: dict) -> str:
    """The property; returns "error: ..." or "ok" and raises AssertionError (or the bug) otherwise."""
    with tempfile.TemporaryDirectory(prefix="lrdeploy-fuzz-") as scratch:
        path, output = Path(scratch) / "model.onnx", Path(scratch) / "out.onnx"
        path.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, report = lrdeploy.compress(path, output=output, **options)
        except LrdeployError as error:
            message = str(error)
            assert "\n" not in message.strip(), f"multi-line message: {message!r}"
            assert message.strip(), "empty message"
            assert "internal error" not in message and "Traceback" not in message, message
            outcome = f"error: {message[:120]}"
        else:
            outcome = _written(path, output, report.notes)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "the input file was modified"
        assert (
            sorted(p.name for p in Path(scratch).iterdir() if not p.name.startswith(("model", "out"))) == []
        )
    return outcome


def _written(path: Path, output: Path, notes: list[str]) -> str:
    """A written output passes the full checker unless the input fails it too, and then the report says so;
    it loads in onnxruntime whenever the input does."""
    checked, loads = _checked(output), _loads(output)
    warned = any("the input already fails it" in note for note in notes)
    if checked:
        assert not warned, "a checker warning on an output that passes the checker"
    else:
        assert not _checked(path), "the input passes the checker but the output does not"
        assert warned, "an output that fails the checker was written without a warning"
    if not loads:
        assert not _loads(path), "the input loads in onnxruntime but the output does not"
    if checked and loads:
        return "ok"
    return "ok (input fails the checker: warned)" if not checked else "ok (neither loads in onnxruntime)"
