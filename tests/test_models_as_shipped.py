"""compress on models the way people ship them: weights in Constant nodes or behind Identity, unnamed and
duplicate nodes, dynamic dims, opset 11 and 17, IR 3 initializers-as-inputs, external data, metadata, and
real exports from torch (TorchScript and dynamo)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lrdeploy
from models import assert_close, check_model, feeds_for, graph_model, rel_error, run, weight


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _conv_bn_fc(rng, opset: int = 17, ir_version: int = 10) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "F", "fb"], ["y"], name="fc", transB=1),
    ]
    params = {
        "W": weight(rng, 8, 3, 3, 3),
        "g": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "b": weight(rng, 8),
        "m": weight(rng, 8),
        "v": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "F": weight(rng, 10, 8 * 4 * 4),
        "fb": weight(rng, 10),
    }
    return graph_model(
        nodes, {"x": ["batch", 3, 4, 4]}, {"y": ["batch", 10]}, params, opset=opset, ir_version=ir_version
    )


def _compress_checked(model, feeds, **options) -> tuple[onnx.ModelProto, lrdeploy.report.Report]:
    """Full-rank-equivalent compress (ratio 1: BN folded only), then a real one; both must be valid."""
    same, report = lrdeploy.compress(model, rank_ratio=1.0, verify=False, **options)
    check_model(same)
    assert_close(run(same, feeds), run(model, feeds))
    compressed, report = lrdeploy.compress(model, rank_ratio=0.25, verify=False, **options)
    check_model(compressed)
    assert run(compressed, feeds)[0].shape == run(model, feeds)[0].shape
    return compressed, report


def test_weights_in_constant_nodes():
    """Conv weight and BN parameters in Constant nodes (value tensors and value_floats)."""
    rng = np.random.default_rng(0)
    model = _conv_bn_fc(rng, opset=13, ir_version=7)
    _, plain = lrdeploy.compress(model, rank_ratio=0.25, verify=False)
    moved = {"W", "g", "v", "F"}
    constants = []
    for tensor in model.graph.initializer:
        if tensor.name == "g":
            values = numpy_helper.to_array(tensor).tolist()
            constants.append(helper.make_node("Constant", [], ["g"], name="", value_floats=values))
        elif tensor.name in moved:
            constants.append(helper.make_node("Constant", [], [tensor.name], name="", value=tensor))
    kept = [t for t in model.graph.initializer if t.name not in moved]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = constants + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    feeds = feeds_for(model)
    compressed, report = _compress_checked(model, feeds)
    assert {b["status"] for b in report.batchnorm} == {"folded"}
    assert [layer.decision.status for layer in report.layers] == ["factorized", "factorized"]
    assert not [n for n in compressed.graph.node if n.op_type == "Constant"]
    assert (report.params_before, report.params_after) == (plain.params_before, plain.params_after)


def test_identity_over_shared_weight():
    """Exporters give each use of a shared (tied) parameter its own Identity."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Identity", ["W"], ["W_a"], name="id_a"),
        helper.make_node("Identity", ["W"], ["W_b"], name="id_b"),
        helper.make_node("MatMul", ["x", "W_a"], ["h"], name="mm_a"),
        helper.make_node("MatMul", ["h", "W_b"], ["y"], name="mm_b"),
    ]
    model = graph_model(nodes, {"x": ["batch", 32]}, {"y": ["batch", 32]}, {"W": weight(rng, 32, 32)})
    compressed, report = _compress_checked(model, feeds_for(model))
    assert [layer.decision.shared_with for layer in report.layers] == [("mm_b",), ("mm_a",)]
    assert len(compressed.graph.initializer) == 2  # factorized once


def test_unnamed_and_duplicate_node_names():
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name=""),
        helper.make_node("Relu", ["h"], ["r"], name="layer"),
        helper.make_node("MatMul", ["r", "W2"], ["h2"], name="layer"),
        helper.make_node("MatMul", ["h2", "W3"], ["y"], name="layer"),
    ]
    params = {"W1": weight(rng, 16, 16), "W2": weight(rng, 16, 16), "W3": weight(rng, 16, 16)}
    model = graph_model(nodes, {"x": [2, 16]}, {"y": [2, 16]}, params)
    compressed, report = lrdeploy.compress(model, rank_ratio=0.25, verify=False)
    check_model(compressed)  # unique node names: onnxruntime loads it
    assert [layer.decision.name for layer in report.layers] == ["MatMul", "layer_1", "layer_2"]
    assert len(compressed.graph.node) == 7
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for index, node in enumerate(renamed.graph.node):
        node.name = f"n{index}"
    same, _ = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    check_model(same)
    feeds = feeds_for(model)
    assert_close(run(same, feeds), run(renamed, feeds))


def test_dynamic_batch_dim_is_kept_and_verified():
    rng = np.random.default_rng(3)
    model = _conv_bn_fc(rng)
    compressed, report = lrdeploy.compress(model, rank_ratio=1.0, verify=True, device="cpu")
    assert report.input_shapes == {"x": [1, 3, 4, 4]}
    assert report.verification is not None and report.verification.max_abs_diff < 1e-4
    dims = compressed.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    feeds = {"x": weight(rng, 5, 3, 4, 4)}
    assert_close(run(compressed, feeds), run(model, feeds))


def test_symbolic_non_batch_dim_with_input_shape():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = graph_model(
        nodes, {"x": ["batch", "seq", 32]}, {"y": ["batch", "seq", 32]}, {"W": weight(rng, 32, 32)}
    )
    with pytest.raises(lrdeploy.UsageError, match=r"dim 1 \(seq\)"):
        lrdeploy.compress(model, rank_ratio=0.25)
    _, report = lrdeploy.compress(model, rank_ratio=0.25, verify=False)
    assert report.macs_before is None  # unknown without a shape, not guessed
    compressed, report = lrdeploy.compress(
        model, rank_ratio=0.25, input_shapes={"x": (2, 7, 32)}, device="cpu"
    )
    assert report.macs_before == 2 * 7 * 32 * 32
    assert report.verification.samples == 2 * 8  # 8 random batches (the default) of 2
    check_model(compressed)


@pytest.mark.parametrize(("opset", "ir_version"), [(11, 6), (13, 7), (17, 8), (21, 10)])
def test_opsets(opset, ir_version):
    rng = np.random.default_rng(opset)
    model = _conv_bn_fc(rng, opset=opset, ir_version=ir_version)
    compressed, report = _compress_checked(model, feeds_for(model))
    assert report.opset == opset
    assert [o.version for o in compressed.opset_import] == [opset]
    assert compressed.ir_version == ir_version


def test_ir3_initializers_listed_as_graph_inputs():
    rng = np.random.default_rng(5)
    model = _conv_bn_fc(rng, opset=11, ir_version=6)
    for tensor in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        )
    model.ir_version = 3
    feeds = feeds_for(model)
    assert list(feeds) == ["x"]
    compressed, report = _compress_checked(model, feeds)
    assert [v.name for v in compressed.graph.input] == ["x"]
    assert report.params_after == sum(int(np.prod(t.dims)) for t in compressed.graph.initializer)
    assert report.params_after < report.params_before
    assert compressed.ir_version >= 6  # what opset 11 needs
    (note,) = [d for d in report.normalized if d["op"] == "graph input"]
    assert note["status"] == "constant" and note["reason"].startswith(f"{len(model.graph.initializer)} init")


def _if_model(rng, weight_in_main: bool) -> onnx.ModelProto:
    """y = x·W, then an If whose branches also read W: how scripted control flow exports shared weights."""
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W"], ["t"], name="then_mm")],
        "then",
        [],
        [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["h", "W"], ["e"], name="else_mul")],
        "else",
        [],
        [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)],
    )
    first = helper.make_node("MatMul", ["x", "W"], ["h"], name="mm") if weight_in_main else None
    nodes = [
        *([first] if first else [helper.make_node("Relu", ["x"], ["h"], name="relu")]),
        helper.make_node("ReduceSum", ["h"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch),
    ]
    params = {"W": weight(rng, 24, 24), "zero": np.zeros((), np.float32)}
    return graph_model(nodes, {"x": [24, 24]}, {"y": [24, 24]}, params)


@pytest.mark.parametrize("weight_in_main", [True, False])
def test_weight_read_inside_if_branches_is_stored_once(weight_in_main):
    model = _if_model(np.random.default_rng(11), weight_in_main)
    same, report = lrdeploy.compress(model, rank_ratio=0.5, verify=False)
    check_model(same)
    assert report.params_after == report.params_before  # W is shared with the branches: left dense, once
    assert [t.name for t in same.graph.initializer].count("W") == 1
    assert not any(a.g.initializer for n in same.graph.node for a in n.attribute if a.g.name)
    for sign in (1, -1):
        feeds = {"x": sign * np.abs(weight(np.random.default_rng(1), 24, 24))}
        assert_close(run(same, feeds), run(model, feeds))


def test_weights_that_are_also_graph_outputs_keep_their_values():
    """The Gemm weight F is an output: factorizing it would store it twice, so it stays dense. The conv
    weight W is an output too: BN folding gives the conv a folded copy and W stays as it was."""
    rng = np.random.default_rng(12)
    model = _conv_bn_fc(rng)
    for tensor in [t for t in model.graph.initializer if t.name in ("W", "F")]:
        model.graph.output.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    feeds = feeds_for(model)
    compressed, report = lrdeploy.compress(model, rank_ratio=0.25, verify=False)
    check_model(compressed)
    decisions = {layer.decision.name: layer.decision for layer in report.layers}
    assert decisions["fc"].status == "skipped" and "graph output" in decisions["fc"].reason
    assert decisions["conv"].status == "factorized"
    assert [b["status"] for b in report.batchnorm] == ["folded"]
    same, _ = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    assert_close(run(same, feeds), run(model, feeds))


def test_bn_after_matmul_is_not_folded_for_an_input_of_unknown_rank():
    """--input-shape fixes what verification feeds, not what the model accepts: a 2-D-only fold is wrong
    for a 3-D input the model also takes."""
    rng = np.random.default_rng(13)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    params = {"W": weight(rng, 20, 16), "g": weight(rng, 16), "b": weight(rng, 16), "m": weight(rng, 16)}
    params["v"] = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    model = graph_model(nodes, {"x": [4, 20]}, {"y": [4, 16]}, params)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    model.graph.output[0].type.tensor_type.ClearField("shape")
    same, report = lrdeploy.compress(model, rank_ratio=1.0, verify=False, input_shapes={"x": (4, 20)})
    assert [b["status"] for b in report.batchnorm] == ["skipped"]
    feeds = {"x": weight(rng, 2, 16, 20)}  # BN's channels are then axis 1, not the MatMul's features
    assert_close(run(same, feeds), run(model, feeds))


def test_bfloat16_weights_are_skipped_with_a_reason():
    w = helper.make_tensor("w", onnx.TensorProto.BFLOAT16, [8, 6], np.arange(48, dtype=np.float32).tolist())
    nodes = [
        helper.make_node("Cast", ["x"], ["xb"], to=onnx.TensorProto.BFLOAT16),
        helper.make_node("MatMul", ["xb", "w"], ["y"], name="mm"),
        helper.make_node("Cast", ["y"], ["z"], to=onnx.TensorProto.FLOAT),
    ]
    model = graph_model(nodes, {"x": [3, 8]}, {"z": [3, 6]})
    model.graph.initializer.append(w)
    _, report = lrdeploy.compress(model, rank_ratio=0.5, verify=False)
    (layer,) = report.layers
    assert layer.decision.status == "skipped" and "bfloat16" in layer.decision.reason
    assert lrdeploy.inspect(model).skipped[0].reason == layer.decision.reason


def test_external_data_loaded_from_another_directory(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    model = _conv_bn_fc(rng)
    source = tmp_path / "src"
    source.mkdir()
    onnx.save(
        model,
        source / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.weights",
        size_threshold=0,
    )
    before = _digest(source)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    compressed, report = lrdeploy.compress(source / "model.onnx", rank_ratio=0.5, output=out, device="cpu")
    assert _digest(source) == before  # the input files are untouched
    assert report.verification is not None
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx"]  # no temporaries, no data file
    saved = onnx.load(out)
    check_model(saved)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in saved.graph.initializer)
    feeds = feeds_for(model)
    assert_close(run(out, feeds), run(compressed, feeds))


def test_metadata_and_doc_strings_are_preserved(tmp_path):
    rng = np.random.default_rng(7)
    model = _conv_bn_fc(rng)
    model.doc_string = "a model"
    model.producer_name, model.producer_version, model.model_version = "maker", "9.9", 42
    helper.set_model_props(model, {"labels": "cat,dog", "license": "MIT"})
    relu = next(n for n in model.graph.node if n.name == "relu")
    relu.doc_string = "the activation"
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    compressed, _ = lrdeploy.compress(path, rank_ratio=0.25, output=tmp_path / "out.onnx", verify=False)
    for out in (compressed, onnx.load(tmp_path / "out.onnx")):
        assert out.doc_string == "a model"
        assert (out.producer_name, out.producer_version, out.model_version) == ("maker", "9.9", 42)
        user = {p.key: p.value for p in out.metadata_props if not p.key.startswith("lrdeploy.")}
        assert user == {"labels": "cat,dog", "license": "MIT"}
        assert next(n for n in out.graph.node if n.name == "relu").doc_string == "the activation"


def test_input_file_and_proto_are_never_modified(tmp_path):
    rng = np.random.default_rng(8)
    model = _conv_bn_fc(rng)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    lrdeploy.compress(path, rank_ratio=0.25, output=tmp_path / "out.onnx", device="cpu")
    assert path.read_bytes() == before
    serialized = model.SerializeToString()
    compressed, _ = lrdeploy.compress(model, rank_ratio=0.25, device="cpu")
    assert model.SerializeToString() == serialized
    assert compressed is not model


def test_default_onnx_ir_version_model_verifies():
    rng = np.random.default_rng(9)
    model = _conv_bn_fc(rng, ir_version=onnx.IR_VERSION)
    _, report = lrdeploy.compress(model, rank_ratio=0.25, device="cpu")
    assert report.verification is not None


def test_default_onnx_ir_version_model_compresses_without_verification():
    rng = np.random.default_rng(9)
    model = _conv_bn_fc(rng, ir_version=onnx.IR_VERSION)
    compressed, _ = lrdeploy.compress(model, rank_ratio=0.25, verify=False)
    check_model(compressed)  # IR lowered to one onnxruntime reads


# --- Real exports from torch ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_net():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(16)
            self.conv2 = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(16)
            self.fc = torch.nn.Linear(16 * 4 * 4, 32)
            self.head = torch.nn.Linear(32, 10, bias=False)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            x = torch.relu(self.bn2(self.conv2(x)))
            return self.head(torch.relu(self.fc(x.flatten(1))))

    net = Net()
    with torch.no_grad():
        for bn in (net.bn, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    net.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = net(x).numpy()
    return torch, net, x, expected


TORCHSCRIPT = {
    "eval": {"training": "EVAL"},
    "preserve": {"training": "PRESERVE"},
    "preserve_no_folding": {"training": "PRESERVE", "do_constant_folding": False},
    "opset11_initializers_as_inputs": {"opset_version": 11, "keep_initializers_as_inputs": True},
    "modules_as_functions": {"training": "PRESERVE", "export_modules_as_functions": True},
}


@pytest.mark.parametrize("variant", sorted(TORCHSCRIPT))
def test_torchscript_export(torch_net, tmp_path, variant):
    torch, net, x, expected = torch_net
    options = dict(TORCHSCRIPT[variant])
    if "training" in options:
        options["training"] = getattr(torch.onnx.TrainingMode, options["training"])
    options.setdefault("opset_version", 17)
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (x,),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            **options,
        )
    exported = onnx.load(path)
    feeds = {"x": x.numpy()}
    same, report = lrdeploy.compress(path, rank_ratio=1.0, device="cpu")
    check_model(same)
    assert not [n for n in same.graph.node if n.op_type == "BatchNormalization"]
    assert rel_error(run(same, feeds)[0], expected) < 1e-5
    assert report.verification.max_abs_diff < 1e-4
    _, report = lrdeploy.compress(path, rank=4, output=tmp_path / "small.onnx", device="cpu")
    check_model(onnx.load(tmp_path / "small.onnx"))
    assert [layer.decision.status for layer in report.layers] == ["factorized"] * 4, [
        (layer.decision.name, layer.decision.reason) for layer in report.layers
    ]
    if variant.startswith("preserve") or exported.functions:
        assert [b["status"] for b in report.batchnorm] == ["folded", "folded"]
    if exported.functions:  # inlined, each layer named by its call-site path, not the inliner's "Conv_0__1"
        call = exported.graph.node[-1].name
        names = [layer.decision.name for layer in report.layers]
        assert all(name.startswith(f"{call}/") and "__" not in name for name in names), names
        assert {d["status"] for d in report.normalized if d["op"] == "function"} == {"inlined"}
    assert report.params_after < report.params_before
    assert run(tmp_path / "small.onnx", feeds)[0].shape == (3, 10)


def test_dynamo_export(torch_net, tmp_path):
    pytest.importorskip("onnxscript")
    torch, net, x, expected = torch_net
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net, (x,), dynamo=True, input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
        program.save(str(path))
    feeds = {"x": x.numpy()}
    same, report = lrdeploy.compress(path, rank_ratio=1.0, device="cpu")
    check_model(same)
    assert rel_error(run(same, feeds)[0], expected) < 1e-5
    compressed, report = lrdeploy.compress(path, rank=4, device="cpu")
    check_model(compressed)
    assert [layer.decision.status for layer in report.layers] == ["factorized"] * 4
    assert run(compressed, feeds)[0].shape == (3, 10)


def test_sparse_initializer_is_counted_and_left_as_it_is():
    rng = np.random.default_rng(14)
    dense = weight(rng, 40, 30) * (rng.random((40, 30)) < 0.3)
    nonzero = np.flatnonzero(dense)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(dense.ravel()[nonzero].astype(np.float32), "w"),
        numpy_helper.from_array(nonzero.astype(np.int64), "w_indices"),
        [40, 30],
    )
    model = graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"x": [3, 40]}, {"y": [3, 30]}
    )
    model.graph.sparse_initializer.append(sparse)
    feeds = feeds_for(model)
    same, report = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    assert report.params_before == report.params_after == len(nonzero)
    assert_close(run(same, feeds), run(model, feeds))


def test_proto_with_unloaded_external_data_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(15)
    onnx.save(_conv_bn_fc(rng), tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    proto = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(
        lrdeploy.errors.ModelError, match=r"external file .* it has not loaded; pass the model's path"
    ):
        lrdeploy.compress(proto, rank_ratio=0.5, verify=False)
    _, report = lrdeploy.compress(tmp_path / "m.onnx", rank_ratio=0.5, verify=False)  # the path works
    assert report.params_after < report.params_before


def test_a_gather_that_expands_a_constant_is_not_folded():
    """A relative-position-bias table gathered by constant indices: folding would store the big result."""
    rng = np.random.default_rng(16)
    nodes = [
        helper.make_node("Gather", ["table", "index"], ["bias"], name="gather"),
        helper.make_node("Add", ["x", "bias"], ["y"], name="add"),
    ]
    index = rng.integers(0, 9, (64, 64)).astype(np.int64)
    model = graph_model(
        nodes, {"x": [64, 64, 4]}, {"y": [64, 64, 4]}, {"table": weight(rng, 9, 4), "index": index}
    )
    same, report = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    assert report.params_after == report.params_before
    assert [n.op_type for n in same.graph.node] == ["Gather", "Add"]


def test_compress_from_threads_leaves_stdout_alone():
    import sys
    import threading

    model = _conv_bn_fc(np.random.default_rng(17))
    stdout = sys.stdout
    threads = [
        threading.Thread(target=lrdeploy.compress, args=(model,), kwargs={"rank_ratio": 0.5})
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sys.stdout is stdout


def _model_zoo_opset7(rng) -> onnx.ModelProto:
    """As the ONNX Model Zoo's older CNNs are: opset 7, IR 3, weights listed as inputs, BN `spatial`."""
    params = {
        "W1": weight(rng, 16, 3, 3, 3, scale=0.2),
        "B1": weight(rng, 16),
        "g": rng.uniform(0.5, 1.5, 16).astype(np.float32),
        "b": weight(rng, 16),
        "m": weight(rng, 16),
        "v": rng.uniform(0.5, 1.5, 16).astype(np.float32),
        "W2": weight(rng, 32, 16, 3, 3, scale=0.2),
        "F": weight(rng, 10, 32 * 4 * 4, scale=0.2),
        "fb": weight(rng, 10),
        "shape": np.array([1, -1], np.int64),
    }
    nodes = [
        helper.make_node(
            "Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]
        ),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["n1"], name="bn1", spatial=1),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("AveragePool", ["r2"], ["a"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["a", "shape"], ["f"]),
        helper.make_node("Dropout", ["f"], ["d"]),
        helper.make_node("Gemm", ["d", "F", "fb"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["y"]),
    ]
    model = graph_model(nodes, {"x": [1, 3, 16, 16]}, {"y": [1, 10]}, params, opset=7, ir_version=3)
    for tensor in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        )
    return model


def test_model_zoo_opset7_cnn_is_upgraded_folded_and_factorized(tmp_path):
    model = _model_zoo_opset7(np.random.default_rng(18))
    onnx.save(model, tmp_path / "zoo7.onnx")
    feeds = feeds_for(model)
    same, report = lrdeploy.compress(tmp_path / "zoo7.onnx", rank_ratio=1.0, device="cpu")
    check_model(same)
    assert report.opset == 7 and model_opset_of(same) == 13
    assert report.notes == ["opset 7 converted to 13 with onnx.version_converter; the output is opset 13"]
    assert [b["status"] for b in report.batchnorm] == ["folded"]
    assert_close(run(same, feeds), run(model, feeds))  # verified against the opset-7 original, too
    assert report.verification.max_abs_diff < 1e-5
    small, report = lrdeploy.compress(tmp_path / "zoo7.onnx", rank_ratio=0.3, verify=False)
    check_model(small)
    assert [layer.decision.status for layer in report.layers] == ["factorized"] * 3


def model_opset_of(model: onnx.ModelProto) -> int:
    return next(e.version for e in model.opset_import if e.domain in ("", "ai.onnx"))
