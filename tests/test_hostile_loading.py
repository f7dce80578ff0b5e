"""Hostile models (issue 14): each is refused when loaded, with exit 2 and one line, by ``compress
--no-verify``, ``inspect`` and ``verify``; no output is left behind, every input file stays byte-identical,
and the refusal is fast. Each model is a few KB, built here with onnx.helper and, for repeated protobuf
fields, raw wire bytes (lrdeploy.io: lazyweights, extdata, tensorcheck, wire)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lrdeploy.cli.app import main
from lrdeploy.errors import ModelError
from lrdeploy.io.lazyweights import load_lazily
from lrdeploy.io.modelio import load_model
from models import IR_VERSION, run

N = 64  # W is N×N float32: 16 KB, above the lazy loader's inline limit, so it is left in the file
VISIBLE = np.eye(N, dtype=np.float32)
HIDDEN = np.eye(N, dtype=np.float32) * 7  # what a loader reading the wrong copy would compress


def _model(weight: TensorProto) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", weight.name or "W"], ["y"], name="fc")],
        "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def _external(location: str, **entries: str) -> TensorProto:
    tensor = numpy_helper.from_array(VISIBLE, "W")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2), encoded by protobuf's own varint encoder."""
    return _VarintBytes(number << 3 | 2) + _VarintBytes(len(payload)) + payload


def _with_raw_initializer(tensor_bytes: bytes) -> bytes:
    """A serialized model whose only initializer is ``tensor_bytes`` exactly as given."""
    model = _model(numpy_helper.from_array(VISIBLE, "W"))
    del model.graph.initializer[:]
    graph = model.graph.SerializeToString() + _field(5, tensor_bytes)  # GraphProto.initializer
    model.ClearField("graph")
    return model.SerializeToString() + _field(7, graph)  # ModelProto.graph


# Each builder writes the hostile model (and its files) into ``folder`` and returns the model's path.


def _save(folder: Path, model: onnx.ModelProto) -> Path:
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _secret(folder: Path) -> Path:
    """A file outside the model's folder, shaped like the weight: reading it would 'work'."""
    secret = folder.parent / "secret.bin"
    secret.write_bytes(HIDDEN.tobytes())
    return secret


def _parent_dir(folder):
    _secret(folder)
    return _save(folder, _model(_external("../secret.bin")))


def _absolute(folder):
    return _save(folder, _model(_external(str(_secret(folder)))))


def _home(folder):
    return _save(folder, _model(_external("~/secret.bin")))


def _symlink_out(folder):
    (folder / "weights.bin").symlink_to(_secret(folder))
    return _save(folder, _model(_external("weights.bin")))


def _empty_name(folder):
    return _save(folder, _model(_external("")))


def _nul_name(folder):
    (folder / "w.bin").write_bytes(VISIBLE.tobytes())
    return _save(folder, _model(_external("w.bin\0../../secret.bin")))


def _fifo(folder):
    os.mkfifo(folder / "w.bin")
    return _save(folder, _model(_external("w.bin")))


def _directory(folder):
    (folder / "w.bin").mkdir()
    return _save(folder, _model(_external("w.bin")))


def _offset_beyond(folder):
    (folder / "w.bin").write_bytes(VISIBLE.tobytes())
    return _save(folder, _model(_external("w.bin", offset=str(VISIBLE.nbytes + 4096))))


def _length_beyond(folder):
    (folder / "w.bin").write_bytes(VISIBLE.tobytes())
    return _save(folder, _model(_external("w.bin", length=str(10**30))))


def _negative_offset(folder):
    (folder / "w.bin").write_bytes(VISIBLE.tobytes())
    return _save(folder, _model(_external("w.bin", offset="-4")))


def _short_external(folder):
    (folder / "w.bin").write_bytes(VISIBLE.tobytes()[:100])
    return _save(folder, _model(_external("w.bin")))


def _duplicate_raw_data(folder):
    """Protobuf (and onnxruntime) keep the last raw_data; a first-match scanner would take HIDDEN."""
    hidden = numpy_helper.from_array(HIDDEN, "W").SerializeToString()
    path = folder / "m.onnx"
    path.write_bytes(_with_raw_initializer(hidden + _field(9, VISIBLE.tobytes())))
    return path


def _inline_and_external(folder):
    """onnxruntime reads the external file (VISIBLE); the inline bytes (HIDDEN) are for other readers."""
    (folder / "w.bin").write_bytes(VISIBLE.tobytes())
    tensor = _external("w.bin")
    tensor.raw_data = HIDDEN.tobytes()
    return _save(folder, _model(tensor))


def _dims(dims: list[int], raw: bytes) -> Callable[[Path], Path]:
    def build(folder):
        tensor = helper.make_tensor("W", TensorProto.FLOAT, [1], [0.0])
        tensor.ClearField("float_data")
        del tensor.dims[:]
        tensor.dims.extend(dims)
        tensor.raw_data = raw
        return _save(folder, _model(tensor))

    return build


def _not_utf8(folder):
    """A weight named with bytes that are not UTF-8 (and a terminal escape): protobuf returns bytes."""
    path = folder / "m.onnx"
    path.write_bytes(_model(numpy_helper.from_array(VISIBLE, "WWWW")).SerializeToString())
    path.write_bytes(path.read_bytes().replace(b"WWWW", b"\xff\x1b]0"))
    return path


def _ff_bytes(folder):
    path = folder / "m.onnx"
    path.write_bytes(b"\xff" * 400_000)
    return path


HOSTILE = {
    "parent_dir": (_parent_dir, "points outside the model's folder"),
    "absolute": (_absolute, "is an absolute path"),
    "home": (_home, "starts in a home directory ('~')"),
    "symlink_out": (_symlink_out, "is a link to a file outside the model's folder"),
    "empty_name": (_empty_name, "is empty"),
    "nul_name": (_nul_name, "contains a NUL byte"),
    "fifo": (_fifo, "is not a regular file"),
    "directory": (_directory, "is not a regular file"),
    "offset_beyond": (_offset_beyond, "is shorter than the tensor's dims need"),
    "length_beyond": (_length_beyond, "has length 1000000000000000000000000000000, but"),
    "negative_offset": (_negative_offset, "offset '-4' is not a non-negative integer"),
    "short_external": (_short_external, "bytes 0-16384 of a 100-byte file"),
    "duplicate_raw_data": (_duplicate_raw_data, "gives its raw_data more than once"),
    "inline_and_external": (_inline_and_external, "both inline data and an external data location"),
    "dims_1e12_tiny_raw": (_dims([1 << 20, 1 << 20], b"\0" * 16), "has 16 bytes of raw data, but its dims"),
    "dims_2e64_wrap": (_dims([1 << 32, 1 << 32], b""), "dims [4294967296, 4294967296], over 2^63 elements"),
    "negative_dims": (_dims([-4, 4], b"\0" * 64), "has negative dims [-4, 4]"),
    "ff_bytes": (_ff_bytes, "a varint longer than 10 bytes"),
    "not_utf8": (_not_utf8, "is not UTF-8 text ('\\xff\\x1b]0')"),
}


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: content hash of regular files, link targets, kinds of the rest."""
    entries = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            entries[str(path)] = "link:" + os.readlink(path)
        elif stat.S_ISREG(mode):
            entries[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            entries[str(path)] = "dir" if stat.S_ISDIR(mode) else "special"
    return entries


class _FifoWatchdog:
    """Unblocks a reader stuck on a FIFO after a few seconds, so a regression fails instead of hanging."""

    def __init__(self, folder: Path) -> None:
        self.fifos = [p for p in folder.rglob("*") if stat.S_ISFIFO(p.lstat().st_mode)]
        self.timer = threading.Timer(5.0, self._release)

    def _release(self) -> None:
        for fifo in self.fifos:
            with contextlib.suppress(OSError):  # no reader: nothing blocked
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    def __enter__(self) -> None:
        if self.fifos:
            self.timer.start()

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


@pytest.fixture
def good_model(tmp_path) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    return _save(folder, _model(numpy_helper.from_array(VISIBLE, "W")))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_model_is_refused_everywhere(capsys, tmp_path, good_model, case):
    build, expected = HOSTILE[case]
    folder = tmp_path / "model"
    folder.mkdir()
    path = build(folder)
    out = tmp_path / "out"
    out.mkdir()
    before = _snapshot(tmp_path)
    commands = [
        ["compress", str(path), "--rank-ratio", "0.5", "--no-verify", "-o", str(out / "o.onnx")],
        ["inspect", str(path)],
        ["verify", str(path), str(good_model)],
        ["verify", str(good_model), str(path)],
    ]
    for argv in commands:
        with _FifoWatchdog(folder):
            start = time.perf_counter()
            code = main(argv)
            elapsed = time.perf_counter() - start
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert code == 2, (argv[0], captured.err)
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        assert expected in lines[0], lines[0]
        assert "Traceback" not in captured.err + captured.out and "internal error" not in lines[0]
        assert elapsed < 3.0, f"{argv[0]} took {elapsed:.1f} s"
    assert list(out.iterdir()) == []
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["duplicate_raw_data", "inline_and_external"])
def test_backdoor_weights_are_not_compressed_behind_verification(capsys, tmp_path, case):
    """The issue's backdoor: onnxruntime runs VISIBLE (so verification of HIDDEN-derived output against
    the file would compare the wrong weights); the loader must refuse rather than read HIDDEN."""
    folder = tmp_path / "model"
    folder.mkdir()
    path = HOSTILE[case][0](folder)
    x = np.arange(N, dtype=np.float32)[None]
    np.testing.assert_array_equal(run(path, {"x": x})[0], x)  # onnxruntime reads the visible weight
    out = tmp_path / "o.onnx"
    assert main(["compress", str(path), "--rank-ratio", "1.0", "-o", str(out)]) == 2
    assert "export or save the model again" in capsys.readouterr().err
    assert not out.exists()


def test_subgraph_initializers_are_checked_too(tmp_path):
    """An If branch's initializer with impossible dims: refused when loaded, like a top-level one."""
    branch_weight = helper.make_tensor("B", TensorProto.FLOAT, [1], [0.0])
    del branch_weight.dims[:]
    branch_weight.dims.extend([1 << 30, 1 << 30])
    branch_weight.ClearField("float_data")
    branch_weight.raw_data = b"\0" * 4
    branch = helper.make_graph(
        [helper.make_node("Identity", ["B"], ["b"])],
        "then",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
        [branch_weight],
    )
    model = _model(numpy_helper.from_array(VISIBLE, "W"))
    model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    model.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    path = _save(tmp_path, model)
    with pytest.raises(ModelError, match=r"tensor 'B' has 4 bytes of raw data"):
        load_model(path)
    with pytest.raises(ModelError, match=r"tensor 'B' has 4 bytes of raw data"):
        load_model(model)  # a proto given to the API: the same dims check


@pytest.mark.parametrize("case", ["inline_and_external", "negative_dims", "dims_2e64_wrap"])
def test_protos_given_to_the_api_get_the_same_checks(tmp_path, case):
    folder = tmp_path / "model"
    folder.mkdir()
    model = onnx.load(HOSTILE[case][0](folder), load_external_data=False)
    with pytest.raises(ModelError, match=re.escape(HOSTILE[case][1])):
        load_model(model)


def test_symlink_inside_the_folder_is_followed(tmp_path):
    """onnxruntime follows a link that stays inside the model's folder; so do we."""
    (tmp_path / "real.bin").write_bytes(VISIBLE.tobytes())
    (tmp_path / "w.bin").symlink_to("real.bin")
    path = _save(tmp_path, _model(_external("w.bin")))
    [tensor] = load_lazily(path).graph.initializer
    assert onnx.external_data_helper.ExternalDataInfo(tensor).location == str(tmp_path / "real.bin")


def test_model_symlink_reads_data_beside_the_link_like_onnxruntime(tmp_path):
    """A linked model's locations are relative to the link's folder (onnxruntime's choice): the loader
    must read the same file onnxruntime runs, not the one beside the link's target."""
    (tmp_path / "target").mkdir()
    (tmp_path / "link").mkdir()
    _save(tmp_path / "target", _model(_external("w.bin")))
    (tmp_path / "target" / "w.bin").write_bytes(HIDDEN.tobytes())
    (tmp_path / "link" / "w.bin").write_bytes(VISIBLE.tobytes())
    (tmp_path / "link" / "m.onnx").symlink_to(tmp_path / "target" / "m.onnx")
    x = np.arange(N, dtype=np.float32)[None]
    np.testing.assert_array_equal(run(tmp_path / "link" / "m.onnx", {"x": x})[0], x)
    [tensor] = load_lazily(tmp_path / "link" / "m.onnx").graph.initializer
    location = onnx.external_data_helper.ExternalDataInfo(tensor).location
    assert location == str(tmp_path / "link" / "w.bin")


def test_ff_bytes_fail_fast(tmp_path):
    path = _ff_bytes(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="varint longer than 10 bytes"):
        load_lazily(path)
    assert time.perf_counter() - start < 0.2


def test_long_varints_scan_in_linear_time(tmp_path):
    """Many 10-byte varints (the longest protobuf allows) in a 2 MB file: one linear pass."""
    path = tmp_path / "m.onnx"
    # Field 100 (unknown to ModelProto), wire type 0, value 2^63 (10 bytes): skipped by every reader.
    field = bytes([0xA0, 0x06]) + b"\x80" * 9 + b"\x01"
    path.write_bytes(_model(numpy_helper.from_array(VISIBLE, "W")).SerializeToString() + field * 170_000)
    start = time.perf_counter()
    load_lazily(path)
    assert time.perf_counter() - start < 5.0


def test_memory_stays_bounded_on_a_dims_bomb(tmp_path):
    """Under a 1 GiB address-space limit, the [1<<20, 1<<20] model is refused, not allocated."""
    path = _dims([1 << 20, 1 << 20], b"\0" * 16)(tmp_path)
    script = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from lrdeploy.cli.app import main
        sys.exit(main(["inspect", {str(path)!r}]))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 2, done.stderr
    assert "has 16 bytes of raw data, but its dims [1048576, 1048576] need 4398046511104" in done.stderr


def _constant(tensor: TensorProto) -> onnx.NodeProto:
    return helper.make_node("Constant", [], ["k"], value=tensor)


def _in_branch(tensor: TensorProto) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Identity", [tensor.name], ["b"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
        [tensor],
    )


def _place(model: onnx.ModelProto, where: str, tensor: TensorProto) -> None:
    """Put ``tensor`` somewhere other than the main graph's initializers."""
    if where == "if_branch":
        model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
        branch = _in_branch(tensor)
        model.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch))
    elif where == "constant_node":
        model.graph.node.append(_constant(tensor))
    elif where == "local_function":
        body = helper.make_function(
            "local", "F", [], ["k"], [_constant(tensor)], [helper.make_opsetid("", 17)]
        )
        model.functions.append(body)
        model.opset_import.append(helper.make_opsetid("local", 1))
        model.graph.node.append(helper.make_node("F", [], ["z"], domain="local"))
    else:
        indices = numpy_helper.from_array(np.array([0], np.int64), "V")
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(tensor, indices, [N * N]))


@pytest.mark.parametrize("where", ["if_branch", "constant_node", "local_function", "sparse_initializer"])
def test_external_data_anywhere_in_the_model_is_resolved_the_same_way(tmp_path, where):
    """Subgraphs, attributes and functions hold tensors too; their locations get the same rules."""
    folder = tmp_path / "model"
    folder.mkdir()
    _secret(folder)
    model = _model(numpy_helper.from_array(VISIBLE, "W"))
    tensor = _external("../secret.bin")
    tensor.name = "V"
    _place(model, where, tensor)
    path = _save(folder, model)
    expected = "points outside" if where != "sparse_initializer" else "sparse tensor 'V' keeps its values"
    with pytest.raises(ModelError, match=expected):
        load_model(path)


def test_graph_attribute_with_another_type_is_refused(tmp_path):
    """onnx's tensor walk follows the attribute's declared type; a graph hidden under INT would escape it."""
    model = _model(numpy_helper.from_array(VISIBLE, "W"))
    _place(model, "if_branch", numpy_helper.from_array(np.ones(2, np.float32), "B"))
    model.graph.node[-1].attribute[0].type = onnx.AttributeProto.INT
    with pytest.raises(ModelError, match="holds a graph but declares type 2"):
        load_model(_save(tmp_path, model))


def test_initializer_defined_twice_is_refused(capsys, tmp_path):
    """Two initializers named W (HIDDEN, then VISIBLE): readers disagree on which one counts."""
    model = _model(numpy_helper.from_array(HIDDEN, "W"))
    model.graph.initializer.append(numpy_helper.from_array(VISIBLE, "W"))
    path = _save(tmp_path, model)
    assert main(["compress", str(path), "--rank-ratio", "1.0", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "graph 'hostile' defines initializer 'W' twice" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


# --- structured fuzzing: external-data entries, repeated fields and dims, against onnxruntime ---------------

_FUZZ_LOCATIONS = [
    "w.bin",
    "./w.bin",
    "sub/../w.bin",
    "../outside.bin",
    "sub/../../outside.bin",
    "ABSOLUTE",
    "",
    "w.bin\0.txt",
    "in_link.bin",
    "out_link.bin",
    "sub",
    "missing.bin",
]
_FUZZ_OFFSETS = [None, "0", "4", "-4", "abc", str(2**70), "BEYOND"]
_FUZZ_LENGTHS = [None, "EXACT", "SHORT", "LONG", "0", "-1"]
_FUZZ_DIMS = [[N, N], [N, N + 1], [N * N], [-N, -N], [2**32, 2**32], [0, N], [N // 2, N]]
LOADED: list[str] = []  # models the fuzzer saw load, for the check that it compares some
_FUZZ_EXTRAS = ["none", "inline_too", "repeat_data_type", "repeat_location", "repeat_raw_data"]


def _fuzz_folder(root: Path) -> Path:
    folder = root / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "w.bin").write_bytes(b"\0" * 4 + VISIBLE.tobytes() + b"\0" * 4)
    (root / "outside.bin").write_bytes((HIDDEN.tobytes()) * 2)
    (folder / "in_link.bin").symlink_to(folder / "w.bin")
    (folder / "out_link.bin").symlink_to(root / "outside.bin")
    return folder


def _fuzz_model(folder: Path, location, offset, length, dims, extra) -> bytes:
    size = (folder / "w.bin").stat().st_size
    exact = 4 * max(0, int(np.prod(dims, dtype=object)))
    entries = {"location": str(folder / "w.bin") if location == "ABSOLUTE" else location}
    if offset is not None:
        entries["offset"] = str(size + 4) if offset == "BEYOND" else offset
    if length is not None:
        lengths = {"EXACT": exact, "SHORT": exact - 4, "LONG": exact + 4}
        entries["length"] = str(lengths.get(length, length))
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    if extra == "inline_too":
        tensor.raw_data = HIDDEN.tobytes()
    blob = tensor.SerializeToString()
    if extra == "repeat_data_type":
        blob += _VarintBytes(2 << 3) + _VarintBytes(TensorProto.DOUBLE)
    elif extra == "repeat_location":
        blob += _VarintBytes(14 << 3) + _VarintBytes(TensorProto.DEFAULT)
    elif extra == "repeat_raw_data":
        blob += _field(9, HIDDEN.tobytes()) + _field(9, VISIBLE.tobytes())
    graph = helper.make_graph(  # the weight itself is the output: any dims make a valid graph
        [helper.make_node("Identity", ["W"], ["y"], name="read")],
        "fuzzed",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    graph = model.graph.SerializeToString() + _field(5, blob)
    model.ClearField("graph")
    return model.SerializeToString() + _field(7, graph)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(  # each entry is the well-formed value half of the time, so some models load and are compared
    location=st.one_of(st.sampled_from(["w.bin", "in_link.bin"]), st.sampled_from(_FUZZ_LOCATIONS)),
    offset=st.one_of(st.just("4"), st.sampled_from(_FUZZ_OFFSETS)),
    length=st.one_of(st.sampled_from(["EXACT", None]), st.sampled_from(_FUZZ_LENGTHS)),
    dims=st.one_of(st.just([N, N]), st.sampled_from(_FUZZ_DIMS)),
    extra=st.one_of(st.just("none"), st.sampled_from(_FUZZ_EXTRAS)),
)
@example(location="sub/../w.bin", offset="4", length="EXACT", dims=[N, N], extra="none")
def test_fuzzed_external_entries_load_what_onnxruntime_reads_or_are_refused(
    tmp_path_factory, location, offset, length, dims, extra
):
    """Whatever the external-data entries, repeated fields and dims say, the loader refuses in one line or
    reads exactly the weight onnxruntime runs, and never a byte outside the model's folder."""
    import onnxruntime as ort

    folder = _fuzz_folder(tmp_path_factory.mktemp("fuzz"))
    path = folder / "m.onnx"
    path.write_bytes(_fuzz_model(folder, location, offset, length, dims, extra))
    try:
        loaded, _ = load_model(path)
        from lrdeploy.io.lazyweights import read_tensor

        ours = read_tensor(loaded.graph.initializer[0])
    except ModelError as error:
        assert "\n" not in str(error) and "Traceback" not in str(error)
        return
    assert location not in ("../outside.bin", "sub/../../outside.bin", "out_link.bin", "ABSOLUTE", "")
    assert extra in ("none",), f"{extra} should have been refused"
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    LOADED.append(location)
    np.testing.assert_array_equal(session.run(None, {})[0], ours)


def test_the_fuzzer_compared_loaded_models_with_onnxruntime():
    if not LOADED:
        pytest.skip("runs after the fuzzer, in the same session")
    assert len(LOADED) >= 2
