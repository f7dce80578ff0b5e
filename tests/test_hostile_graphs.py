"""Hostile graphs (issue 14, items 3 and 6): tiny models that describe huge or endless work.

Each model is built here. The bombs run the CLI in a child process under an address-space limit and
report their peak memory: refused with exit 2 and one line (or compressed safely), in seconds, with
nothing left behind and the input unchanged. Without the size rules each of them allocates gigabytes
(or loops): they fail the limit, the peak or the time bound.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrdeploy.cli.app import main
from lrdeploy.errors import ModelError
from lrdeploy.io.constfold import FOLDABLE, evaluate_node
from lrdeploy.io.resultsize import SIZED_OPS, result_elements
from lrdeploy.io.structure import MAX_CALL_DEPTH, MAX_EXPANDED_BYTES, check_structure
from lrdeploy.passes.names import NameRegistry, name_nodes
from lrdeploy.passes.normalize import WEIGHT_PATH_OPS
from lrdeploy.runtime.inputs import MAX_RANDOM_BYTES
from models import check_model

FLOAT = TensorProto.FLOAT
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
#: Address space for a child: onnxruntime and numpy need ~1 GiB of it mapped; the bombs need far more.
ADDRESS_SPACE = 2 << 30
#: Peak resident memory a refused or safely compressed bomb may reach (a plain run peaks near 100 MiB).
PEAK = 400 << 20
SECONDS = 60

_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from lrdeploy.cli.app import main
code = main(sys.argv[2:])
# VmHWM, not ru_maxrss: that one keeps the high-water mark of the forked test process across exec
peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
open(sys.argv[1], "w").write(peak)
sys.exit(code)
"""


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 10
    onnx.save(model, path)
    return path


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def _run_bounded(argv: list[str], tmp_path: Path) -> tuple[int, str, str]:
    """Run the CLI in a child under ADDRESS_SPACE; check time and peak memory; (code, stdout, stderr)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc (Linux)")
    report = tmp_path.parent / f"{tmp_path.name}.peak"
    start = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(limit=ADDRESS_SPACE), str(report), *argv],
        capture_output=True,
        text=True,
        timeout=SECONDS * 3,
        env={**os.environ, "COLUMNS": "300"},  # table cells unwrapped
    )
    elapsed = time.monotonic() - start
    assert elapsed < SECONDS, f"took {elapsed:.0f} s: {child.stderr[-500:]}"
    assert report.exists(), f"the child died: {child.returncode} {child.stderr[-500:]}"
    peak = int(report.read_text()) * 1024
    assert peak < PEAK, f"peak {peak >> 20} MiB: {child.stderr[-500:]}"
    assert "Traceback" not in child.stdout + child.stderr
    return child.returncode, child.stdout, child.stderr


def _refused(argv: list[str], tmp_path: Path, words: str) -> None:
    """Exit 2 with one line naming what is wrong; nothing written, the input unchanged."""
    before = _digests(tmp_path)
    code, _, err = _run_bounded(argv, tmp_path)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert _digests(tmp_path) == before


def _commands(path: Path) -> dict[str, list[str]]:
    out = str(path.with_name("out.onnx"))
    return {
        "no-verify": ["compress", str(path), "--rank-ratio", "0.5", "--no-verify", "-o", out],
        "inspect": ["inspect", str(path)],
        "verify": ["compress", str(path), "--rank-ratio", "0.5", "-o", out],
    }


# --- local functions ------------------------------------------------------------------------------


def _function(name: str, nodes: list[onnx.NodeProto]) -> onnx.FunctionProto:
    return helper.make_function("local", name, ["x"], ["y"], nodes, OPSETS)


def _call(callee: str, inputs: str, output: str, name: str = "") -> onnx.NodeProto:
    return helper.make_node(callee, [inputs], [output], domain="local", name=name)


def _functions_model(functions: list[onnx.FunctionProto], top: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        [_call(top, "x", "y", "top")],
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", FLOAT, [4, 4])],
    )
    return helper.make_model(graph, opset_imports=OPSETS, functions=functions)


def _nested(depth: int, calls: int = 2, name: str = "") -> onnx.ModelProto:
    """F_k calls F_{k-1} ``calls`` times in a chain; F_0 is a MatMul: calls^depth nodes once inlined."""
    functions = [_function("F0", [helper.make_node("MatMul", ["x", "x"], ["y"])])]
    for k in range(1, depth + 1):
        chain = [f"h{i}" for i in range(calls - 1)]
        nodes = [
            _call(f"F{k - 1}", source, target, name)
            for source, target in zip(["x", *chain], [*chain, "y"], strict=True)
        ]
        functions.append(_function(f"F{k}", nodes))
    return _functions_model(functions, f"F{depth}")


@pytest.mark.parametrize("command", ["no-verify", "inspect", "verify"])
def test_nested_functions_are_counted_before_inlining(tmp_path, command):
    path = _save(_nested(22), tmp_path / "nested.onnx")  # 2^22 MatMuls from ~1 KB
    assert path.stat().st_size < 3000
    _refused(_commands(path)[command], tmp_path, "expand to more than 1,000,000 nodes")


def test_nested_functions_within_the_bound_are_inlined(tmp_path):
    path = _save(_nested(3), tmp_path / "nested.onnx")
    out = tmp_path / "out.onnx"
    assert main(["compress", str(path), "--rank-ratio", "0.5", "-o", str(out)]) == 0
    inlined = onnx.load(out)
    assert len(inlined.graph.node) == 8 and not inlined.functions
    check_model(inlined)


def test_long_call_site_names_count_toward_the_bound():
    """Inlined nodes are named after their call sites: 4^8 nodes under 8 names of 2 KB each are 512 MiB."""
    model = _nested(8, calls=4, name="n" * 2000)
    with pytest.raises(ModelError, match=f"{MAX_EXPANDED_BYTES >> 20} MiB"):
        check_structure(model)
    check_structure(_nested(8, calls=4, name="n"))  # the same nesting with short names is fine


@pytest.mark.parametrize("cycle", ["F-F", "F-G-F"])
@pytest.mark.parametrize("command", ["no-verify", "inspect"])
def test_recursive_function_is_refused(capsys, tmp_path, cycle, command):
    names = cycle.split("-")[:-1]
    functions = [
        _function(name, [helper.make_node("MatMul", ["x", "x"], ["h"]), _call(callee, "h", "y")])
        for name, callee in zip(names, [*names[1:], names[0]], strict=True)
    ]
    path = _save(_functions_model(functions, "F"), tmp_path / "recursive.onnx")
    before = _digests(tmp_path)
    assert main(_commands(path)[command]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "local function 'F' calls itself" in err
    assert _digests(tmp_path) == before


@pytest.mark.parametrize("depth", [MAX_CALL_DEPTH, MAX_CALL_DEPTH + 1])
def test_call_depth_matches_onnx(depth):
    """onnx's shape inference allows 100 functions on a call chain; so do we, and no more."""
    functions = [_function("F0", [helper.make_node("Relu", ["x"], ["y"])])]
    functions += [_function(f"F{k}", [_call(f"F{k - 1}", "x", "y")]) for k in range(1, depth)]
    model = _functions_model(functions, f"F{depth - 1}")
    model.ir_version = 10
    if depth > MAX_CALL_DEPTH:
        with pytest.raises(ModelError, match=f"{depth} deep"):
            check_structure(model)
        with pytest.raises(onnx.checker.ValidationError, match="depth exceeds"):
            onnx.shape_inference.infer_shapes(model, strict_mode=True)
    else:
        check_structure(model)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)


# --- cycles ---------------------------------------------------------------------------------------


def _cycle_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["x", "z"], ["h"], name="add"),
        helper.make_node("MatMul", ["h", "W"], ["z"], name="mm"),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=OPSETS[:1])


@pytest.mark.parametrize("command", ["no-verify", "inspect", "verify"])
def test_graph_cycle_is_refused(capsys, tmp_path, command):
    path = _save(_cycle_model(), tmp_path / "cycle.onnx")
    before = _digests(tmp_path)
    assert main(_commands(path)[command]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "has a cycle ('add' → 'mm' → 'add')" in err, err
    assert _digests(tmp_path) == before


def _if_with_cycle() -> onnx.ModelProto:
    """The branch of an If reads the If's own output: a cycle through the outer scope."""
    branch = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["b"], name="reads_y")],
        "then",
        [],
        [helper.make_tensor_value_info("b", FLOAT, [1])],
    )
    nodes = [helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", FLOAT, [1])],
    )
    return helper.make_model(graph, opset_imports=OPSETS[:1])


def _self_loop() -> onnx.ModelProto:
    model = _cycle_model()
    model.graph.node[0].input[1] = "x"  # no cycle through add and mm: only relu reads its own output
    model.graph.node[2].input[0] = "y"
    return model


def _function_body_cycle() -> onnx.ModelProto:
    body = [
        helper.make_node("Add", ["x", "b"], ["a"], name="a"),
        helper.make_node("Relu", ["a"], ["b"], name="b"),
    ]
    body.append(helper.make_node("Identity", ["b"], ["y"]))
    return _functions_model([_function("F", body)], "F")


def _two_producers() -> onnx.ModelProto:
    model = _cycle_model()
    model.graph.node[1].output[0] = "h"
    return model


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (_if_with_cycle, "the graph has a cycle ('if' → 'if')"),
        (_self_loop, "the graph has a cycle ('relu' → 'relu')"),
        (_function_body_cycle, "local function 'F' has a cycle"),
        (_two_producers, "tensor 'h' is the output of two nodes"),
    ],
)
def test_malformed_structure_is_refused(build, words):
    with pytest.raises(ModelError, match="malformed") as error:
        check_structure(build())
    assert words in str(error.value)


# --- evaluation of constants ----------------------------------------------------------------------


def _weight_path_model(n: int, producer: str) -> tuple[onnx.ModelProto, int]:
    """A MatMul whose weight is computed from constants: an [n, n] result from a few bytes."""
    if producer == "ConstantOfShape":
        stored = [numpy_helper.from_array(np.array([n, n], dtype=np.int64), "s")]
        value = helper.make_tensor("v", FLOAT, [1], [0.5])
        nodes = [helper.make_node("ConstantOfShape", ["s"], ["W"], value=value)]
    else:  # a broadcasting Mul on the weight path, which normalize folds
        column, row = np.ones((n, 1), np.float32), np.ones((1, n), np.float32)
        stored = [numpy_helper.from_array(column, "a"), numpy_helper.from_array(row, "b")]
        nodes = [helper.make_node("Mul", ["a", "b"], ["W"])]
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", FLOAT, [1, n])],
        stored,
    )
    return helper.make_model(graph, opset_imports=OPSETS[:1]), n * n * 4


@pytest.mark.parametrize("producer", ["ConstantOfShape", "Mul"])
@pytest.mark.parametrize("command", ["no-verify", "inspect"])
def test_weight_path_bomb_is_not_evaluated(tmp_path, producer, command):
    model, result_bytes = _weight_path_model(12_000, producer)  # 576 MiB, above the peak allowed
    assert result_bytes > PEAK
    path = _save(model, tmp_path / "bomb.onnx")
    before = _digests(tmp_path)
    code, out, err = _run_bounded(_commands(path)[command], tmp_path)
    assert code == 0, err
    assert "mm" in out and "computed at run time" in out  # left unfolded, and said so
    if command == "no-verify":
        written = tmp_path / "out.onnx"
        assert written.stat().st_size < path.stat().st_size + 4096  # + provenance metadata, no weight
        check_model(onnx.load(written))
        written.unlink()
    assert _digests(tmp_path) == before


def _node(op: str, inputs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, ["out"], **attrs)


_I64 = np.int64
_SIZES = [
    (_node("ConstantOfShape", ["s"]), [np.array([40_000, 40_000], _I64)], 1_600_000_000),
    (_node("ConstantOfShape", ["s"]), [np.array([-1, 4], _I64)], None),
    (_node("Mul", ["a", "b"]), [np.ones((3, 1)), np.ones((1, 5))], 15),
    (_node("Add", ["a", "b"]), [np.ones((3, 2)), np.ones((1, 5))], None),  # not broadcastable
    (_node("Where", ["c", "a", "b"]), [np.ones((4, 1, 1), bool), np.ones((1, 3, 1)), np.ones(2)], 24),
    (_node("Expand", ["a", "s"]), [np.ones((3, 1)), np.array([2, 1, 7], _I64)], 42),
    (_node("Tile", ["a", "r"]), [np.ones((2, 3)), np.array([1 << 20, 1 << 20], _I64)], 6 << 40),
    (_node("Range", ["s", "l", "d"]), [np.array(0.0), np.array(1e12), np.array(1.0)], 10**12),
    (_node("Range", ["s", "l", "d"]), [np.array(5), np.array(0), np.array(1)], 0),
    (_node("Range", ["s", "l", "d"]), [np.array(0), np.array(5), np.array(0)], None),
    (_node("Range", ["s", "l", "d"]), [np.array(0.0), np.array(np.inf), np.array(1.0)], None),
    (_node("ReduceSum", ["a"], keepdims=1), [np.ones((0, 4096, 4096))], 4096 * 4096),
    (_node("Gather", ["a", "i"], axis=1), [np.ones((2, 3, 4)), np.zeros((5, 6), _I64)], 2 * 5 * 6 * 4),
    (_node("Concat", ["a", "b"], axis=0), [np.ones((2, 3)), np.ones((4, 3))], 18),
    (_node("Transpose", ["a"]), [np.ones((2, 3))], 6),
    (_node("Constant", [], value=helper.make_tensor("v", FLOAT, [2, 3], [0] * 6)), [], 6),
    (_node("Pad", ["a", "p"]), [np.ones(2), np.array([1 << 40, 0], _I64)], None),  # not sized: not evaluated
]


@pytest.mark.parametrize(
    ("node", "inputs", "expected"), _SIZES, ids=[f"{n.op_type}{i}" for i, (n, _, _) in enumerate(_SIZES)]
)
def test_result_elements_before_evaluation(node, inputs, expected):
    assert result_elements(node, inputs) == expected


def test_every_op_folded_is_sized():
    """A foldable op without a size rule would never be folded: adding one to a fold list needs a rule."""
    assert FOLDABLE | WEIGHT_PATH_OPS <= SIZED_OPS


def test_sparse_constant_is_sized_by_its_dense_shape():
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("v", FLOAT, [1], [1.0]),
        helper.make_tensor("i", TensorProto.INT64, [1], [0]),
        [1 << 30, 1 << 30],
    )
    node = helper.make_node("Constant", [], ["out"], sparse_value=sparse)
    assert result_elements(node, []) == 1 << 60
    assert evaluate_node(node, [], 17, max_elements=4096) is None


def test_evaluate_node_keeps_to_its_bound():
    node = _node("Mul", ["a", "b"])
    column, row = np.ones((100, 1), np.float32), np.ones((1, 100), np.float32)
    assert evaluate_node(node, [column, row], 17, max_elements=200) is None
    (product,) = evaluate_node(node, [column, row], 17, max_elements=10_000)
    assert product.shape == (100, 100)
    start = time.monotonic()
    range_node = _node("Range", ["s", "l", "d"])
    assert evaluate_node(range_node, [np.array(0.0), np.array(1e15), np.array(1.0)], 17, 4096) is None
    assert time.monotonic() - start < 1


# --- random verification inputs -------------------------------------------------------------------


def _input_model(dims: list, dtype: int = FLOAT) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, dims)],
        [helper.make_tensor_value_info("y", FLOAT, None)],
        [weight],
    )
    return helper.make_model(graph, opset_imports=OPSETS[:1])


@pytest.mark.parametrize("command", ["verify", "verify-command"])
def test_random_inputs_are_sized_before_allocation(tmp_path, command):
    path = _save(_input_model([1, 10_000, 10_000, 4]), tmp_path / "wide.onnx")
    argv = ["verify", str(path), str(path)] if command == "verify-command" else _commands(path)["verify"]
    _refused(argv, tmp_path, "random inputs would take 1,526 MiB")


def test_random_inputs_at_given_shape_are_sized(capsys, tmp_path):
    path = _save(_input_model(["batch", "n", 4]), tmp_path / "open.onnx")
    length = MAX_RANDOM_BYTES // 16 + 1  # float32 [1, length, 4]: one element over the limit
    argv = [*_commands(path)["verify"], "--input-shape", f"x:1,{length},4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "over the 256 MiB limit" in err and "--input-shape x:" in err and "--data" in err
    assert main([*_commands(path)["verify"], "--input-shape", "x:1,1000,4"]) == 0


def test_rank0_bool_input_under_random_verification(capsys, tmp_path):
    weight = numpy_helper.from_array(np.eye(8, dtype=np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Where", ["c", "h", "x"], ["y"], name="pick"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", FLOAT, [1, 8]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", FLOAT, [1, 8])],
        [weight],
    )
    path = _save(helper.make_model(graph, opset_imports=OPSETS[:1]), tmp_path / "flag.onnx")
    assert main(_commands(path)["verify"]) == 0, capsys.readouterr().err
    assert "verified on CPUExecutionProvider" in capsys.readouterr().out
    check_model(onnx.load(tmp_path / "out.onnx"))


# --- naming ---------------------------------------------------------------------------------------


def test_naming_20000_unnamed_nodes_is_linear():
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(20_000)]
    nodes[5].name = "Relu_7"  # a taken suffix is skipped, as before
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("t0", FLOAT, [1])],
        [helper.make_tensor_value_info("t20000", FLOAT, [1])],
    )
    start = time.monotonic()
    result = name_nodes(graph)
    assert time.monotonic() - start < 1.5
    names = [node.name for node in graph.node]
    expected = [f"Relu_{i}" if i else "Relu" for i in range(20_000) if i != 7]
    assert names[:5] == expected[:5] and names[5] == "Relu_7" and names[6:] == expected[5:]
    assert len(result.decisions) == 19_999


def test_registry_suffixes_as_before():
    import onnx_graphsurgeon as gs

    names = NameRegistry(gs.Graph(nodes=[gs.Node("Relu", name=n) for n in ("a", "a_1", "a_3", "b")]))
    assert [names.node("a") for _ in range(3)] == ["a_2", "a_4", "a_5"]
    assert names.node("c") == "c" and names.node("c") == "c_1"
    assert names.node("a_1") == "a_1_1"
    assert names.tensor("a") == "a"
