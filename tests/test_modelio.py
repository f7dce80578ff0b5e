"""Loading with checks, atomic saving, external data, IR versions onnxruntime reads (io/modelio.py)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lrdeploy
from lrdeploy.errors import ModelError, RuntimeFailure, UsageError
from lrdeploy.io import modelio
from lrdeploy.io.modelio import (
    choose_ir_version,
    default_output_path,
    load_model,
    model_opset,
    save_model,
    write_text_atomic,
)
from models import check_model, feeds_for, graph_model, parse, run, weight


def _mlp(opset: int = 17, ir_version: int = 10, size: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["y"], name="add"),
    ]
    params = {"W": weight(rng, size, size), "b": weight(rng, size)}
    return graph_model(
        nodes, {"x": ["batch", size]}, {"y": ["batch", size]}, params, opset=opset, ir_version=ir_version
    )


def _files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- load_model -------------------------------------------------------------------------------------------


def test_load_path_and_proto(tmp_path):
    model = _mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded, source = load_model(path)
    assert source == path and model_opset(loaded) == 17
    copy, source = load_model(model)
    assert source is None and copy is not model
    copy.graph.node[0].name = "changed"
    assert model.graph.node[0].name == "mm"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "the file is empty"),
        (b"hello, this is text\n", "is not an ONNX model"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "is not an ONNX model"),
        (b"\xff" * 32, "is not an ONNX model"),
        (b'{"nodes": []}', "is not an ONNX model"),
        (onnx.TensorProto(name="t", dims=[2]).SerializeToString(), "is not an ONNX model"),
    ],
    ids=["empty", "text", "png", "ff", "json", "tensor"],
)
def test_not_onnx(tmp_path, payload, message):
    path = tmp_path / "file.onnx"
    path.write_bytes(payload)
    with pytest.raises(ModelError, match=message) as raised:
        load_model(path)
    assert raised.value.exit_code == 2
    assert "\n" not in str(raised.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelError, match="no such file") as raised:
        load_model(tmp_path / "missing.onnx")
    assert raised.value.exit_code == 2
    with pytest.raises(ModelError, match="is not a file"):
        load_model(tmp_path)
    with pytest.raises(UsageError, match=r"expected a path or an onnx\.ModelProto"):
        load_model(42)


@pytest.mark.parametrize("opset", [7, 9, 10])
def test_old_opset_is_upgraded_to_13(tmp_path, opset):
    from lrdeploy.passes.upgrade import upgrade_opset

    model = _mlp(opset=opset, ir_version=5)
    upgraded, result = upgrade_opset(model)
    assert model_opset(upgraded) == 13 and model_opset(model) == opset
    (decision,) = result.decisions
    assert decision.action == "upgraded" and f"opset {opset} converted to 13" in decision.reason
    assert upgrade_opset(upgraded)[0] is upgraded  # nothing to do at 11+


def test_opset_ir_and_domain_checks():
    model = _mlp()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    with pytest.raises(ModelError, match="newer than this onnx knows"):
        load_model(model)
    model = _mlp()
    model.ir_version = onnx.IR_VERSION + 1
    with pytest.raises(ModelError, match="IR version"):
        load_model(model)
    model = _mlp()
    model.opset_import[0].domain = "com.example"
    with pytest.raises(ModelError, match="no default-domain opset"):
        load_model(model)


def test_missing_external_data_is_a_model_error(tmp_path):
    onnx.save(_mlp(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    (tmp_path / "m.data").unlink()
    with pytest.raises(
        ModelError, match=r"m\.onnx: tensor '.*': external data location 'm\.data' names no file"
    ):
        load_model(tmp_path / "m.onnx")


def test_files_read_are_the_real_files_behind_every_location(tmp_path, monkeypatch):
    """A location that is a link inside the folder protects the file it points to from every output."""
    monkeypatch.chdir(tmp_path)
    onnx.save(_mlp(), "m.onnx", save_as_external_data=True, location="real.data", size_threshold=0)
    model = onnx.load("m.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        next(e for e in tensor.external_data if e.key == "location").value = "link.data"
    onnx.save(model, "m.onnx")
    (tmp_path / "link.data").symlink_to("real.data")
    loaded, source = load_model("m.onnx")
    assert set(modelio.files_read(loaded, source)) == {source, tmp_path / "real.data"}
    with pytest.raises(UsageError, match="is a file the input model reads"):
        modelio.check_output_target(tmp_path / "link.data", "-o", modelio.files_read(loaded, source))


def test_proto_with_inline_and_external_data_is_refused_before_anything_reads_it():
    model = _mlp()
    tensor = model.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="W.bin")
    with pytest.raises(ModelError, match="tensor 'W' has both inline data and an external data location"):
        load_model(model)


def test_proto_with_dims_that_do_not_match_its_data_is_refused():
    model = _mlp()
    model.graph.initializer[0].dims[0] = 1 << 40
    with pytest.raises(ModelError, match=r"tensor 'W' has 16384 bytes of raw data, but its dims"):
        load_model(model)


# --- save_model -------------------------------------------------------------------------------------------


def test_save_is_atomic_and_replaces(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old contents")
    source = tmp_path / "src"
    source.mkdir()
    onnx.save(_mlp(), source / "m.onnx")
    lazy, _ = load_model(source / "m.onnx")
    assert save_model(lazy, out) is None
    assert _files(tmp_path) == ["out.onnx", "src"]  # no temporaries left
    saved = onnx.load(out)
    check_model(saved)
    original = {t.name: numpy_helper.to_array(t) for t in _mlp().graph.initializer}
    for tensor in saved.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), original[tensor.name])
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(UsageError, match="does not exist") as raised:
        save_model(_mlp(), tmp_path / "nowhere" / "out.onnx")
    assert raised.value.exit_code == 2


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.onnx"
    target.mkdir()  # the rename onto a directory fails
    with pytest.raises(RuntimeFailure, match="could not write"):
        save_model(_mlp(), target)
    assert _files(tmp_path) == ["out.onnx"]
    assert list(target.iterdir()) == []


def test_large_model_gets_external_data(tmp_path, monkeypatch):
    """Above the threshold the weights go to <output>.data, page-aligned; the model loads from anywhere."""
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = _mlp()
    model.graph.initializer.append(numpy_helper.from_array(np.ones((40, 40), np.float32), "unused"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    data = save_model(model, out_dir / "big.onnx")
    assert data == out_dir / "big.onnx.data"
    assert _files(out_dir) == ["big.onnx", "big.onnx.data"]
    header = onnx.load(out_dir / "big.onnx", load_external_data=False)
    locations = {t.name: t.data_location for t in header.graph.initializer}
    assert locations == {"W": 1, "b": 0, "unused": 1}  # b is too small to move
    infos = [onnx.external_data_helper.ExternalDataInfo(t) for t in header.graph.initializer if t.name != "b"]
    assert {info.location for info in infos} == {"big.onnx.data"}  # relative: the pair moves together
    assert [info.offset for info in infos] == [0, 4096 * 4]  # 64·64·4 bytes, then the next page
    monkeypatch.chdir(tmp_path)
    feeds = feeds_for(_mlp())
    np.testing.assert_array_equal(run(out_dir / "big.onnx", feeds)[0], run(_mlp(), feeds)[0])


def test_write_text_atomic(tmp_path):
    path = tmp_path / "report.json"
    write_text_atomic(path, "{}\n")
    write_text_atomic(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'
    assert _files(tmp_path) == ["report.json"]
    with pytest.raises(RuntimeFailure):
        write_text_atomic(tmp_path / "missing" / "r.json", "x")


def test_default_output_path(tmp_path):
    assert default_output_path(tmp_path / "net.onnx") == tmp_path / "net.lowrank.onnx"
    assert default_output_path(tmp_path / "net.pb") == tmp_path / "net.pb.lowrank.onnx"


# --- IR versions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_ir", "opset", "expected"),
    [(onnx.IR_VERSION, 17, 10), (13, 17, 10), (10, 17, 10), (8, 17, 8), (6, 11, 6), (3, 11, 6), (7, 13, 7)],
)
def test_choose_ir_version(input_ir, opset, expected):
    model = _mlp(opset=opset, ir_version=input_ir)
    assert choose_ir_version(input_ir, model) == expected


def test_newest_opset_gets_the_ir_it_needs():
    opset = onnx.defs.onnx_opset_version()
    model = _mlp(opset=opset, ir_version=onnx.IR_VERSION)
    needed = helper.find_min_ir_version_for(list(model.opset_import))
    assert choose_ir_version(model.ir_version, model) == max(needed, 10)


def test_onnx_default_ir_is_lowered_so_onnxruntime_loads_the_output():
    import lrdeploy

    model = _mlp(ir_version=onnx.IR_VERSION)
    # The premise held with onnxruntime 1.31 (it refuses the IR 14 that onnx 1.23 writes by default);
    # 1.32 reads it. Either way the output is lowered to an IR that older runtimes read too.
    compressed, _ = lrdeploy.compress(model, rank_ratio=0.25, verify=False)
    assert compressed.ir_version == 10
    check_model(compressed)


@pytest.mark.parametrize(
    ("opset", "mode", "scale"), [(9, "linear", 2.0), (9, "nearest", 1.5), (7, "nearest", 2.0)]
)
def test_upgraded_upsample_keeps_its_coordinates(opset, mode, scale):
    """Upsample sampled at x / scale; Resize-13 without attributes means half_pixel: other numbers."""
    scales = [1.0, 1.0, scale, scale]
    if opset == 7:
        node = onnx.helper.make_node("Upsample", ["x"], ["y"], mode=mode, scales=scales)
        params = {}
    else:
        node = onnx.helper.make_node("Upsample", ["x", "s"], ["y"], mode=mode)
        params = {"s": np.array(scales, np.float32)}
    size = int(4 * scale)
    model = graph_model(
        [node], {"x": [1, 2, 4, 4]}, {"y": [1, 2, size, size]}, params, opset=opset, ir_version=4
    )
    same, report = lrdeploy.compress(model, rank_ratio=1.0, device="cpu")
    assert report.notes and report.verification.max_abs_diff < 1e-6
    feeds = feeds_for(model)
    np.testing.assert_allclose(run(same, feeds)[0], run(model, feeds)[0], atol=1e-6)


def test_old_hardmax_is_refused_rather_than_changed():
    node = onnx.helper.make_node("Hardmax", ["x"], ["y"], name="hm")
    model = graph_model([node], {"x": [2, 3, 4]}, {"y": [2, 3, 4]}, opset=9, ir_version=4)
    with pytest.raises(
        ModelError, match="Hardmax 'hm', whose meaning onnx's version converter does not carry"
    ):
        lrdeploy.compress(model, rank_ratio=1.0, verify=False)


def test_a_folded_scalar_stays_a_scalar():
    values = ",".join(["0.1"] * 256)
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["": 13]>
        g (float[2, 16] x) => (float[2, 16] y) <float[16, 16] w = {{{values}}}> {{
            c = Constant<value = int64 {{8}}>()
            cf = Cast<to = 1>(c)
            h = MatMul(x, w)
            y = Pow(h, cf)
        }}"""
    )
    same, _ = lrdeploy.compress(model, rank_ratio=1.0, verify=False)
    check_model(same)
    assert [list(t.dims) for t in same.graph.initializer if t.name != "w"] == [[]]


def test_a_file_backed_weight_read_by_a_pass_exports_inline(tmp_path):
    """Reading a lazily loaded weight's values (as a pass may) must not leave it flagged as external data
    without a location: graphsurgeon copies the imported data_location onto the array it exports."""
    from lrdeploy.io.graphio import from_graph, to_graph
    from lrdeploy.io.modelio import materialize

    path = tmp_path / "m.onnx"
    onnx.save(_mlp(size=64), path)  # W: 16 KB, over the inline threshold, so it stays in the file
    model, _ = load_model(path)
    graph = to_graph(model)
    w = next(t for t in graph.tensors().values() if t.name == "W")
    w.values = w.values * 2.0  # read, then replaced in place by a pass
    out = materialize(from_graph(graph, model, choose_ir_version(model.ir_version, model)))
    stored = next(t for t in out.graph.initializer if t.name == "W")
    assert stored.data_location == onnx.TensorProto.DEFAULT
    np.testing.assert_allclose(
        numpy_helper.to_array(stored), 2.0 * numpy_helper.to_array(_mlp().graph.initializer[0])
    )
