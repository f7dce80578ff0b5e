"""Outputs (lrdeploy/io/outputs.py): staged beside their targets and promoted only when the run succeeds; a
model and its external data promoted together; none replaces a file the model reads; modes no wider than
the input's."""

from __future__ import annotations

import json
import os

import onnx
import pytest
from test_cli import _error, _model, _snapshot

import lrdeploy
from lrdeploy.cli.app import main
from lrdeploy.errors import RuntimeFailure, UsageError
from lrdeploy.io import modelio
from lrdeploy.io.outputs import OutputSet, output_mode
from models import check_model, feeds_for, run

GATE_FAILS = ["--rank", "1", "--random-batches", "2", "--max-rel-l2", "1e-9"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _hidden(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- OutputSet ----------------------------------------------------------------------------------------------


def test_staged_files_appear_only_when_promoted(tmp_path):
    target, other = tmp_path / "a.json", tmp_path / "sub" / "b.txt"
    other.parent.mkdir()
    with OutputSet() as outputs:
        outputs.check(target, "--json")
        outputs.write_text(target, "{}")
        staged = outputs.stage(other, "--plot")
        staged.write_text("plot")
        assert staged.name == "b.txt" and staged.parent.name.startswith(".b.txt.")
        assert not target.exists() and not other.exists()
        outputs.promote()
    assert target.read_text() == "{}" and other.read_text() == "plot"
    assert _hidden(tmp_path) == [] and _hidden(other.parent) == []


def test_a_failure_promotes_nothing_and_leaves_nothing(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), OutputSet() as outputs:
        outputs.write_text(target, "new")
        raise RuntimeError("the run failed")
    assert target.read_text() == "old"
    assert _hidden(tmp_path) == []


def test_companions_are_promoted_first(tmp_path, monkeypatch):
    """The data file is in place before the model that points into it."""
    order = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(os.path.basename(b)), real_replace(a, b)))
    with OutputSet() as outputs:
        outputs.stage(tmp_path / "m.onnx", "-o").write_bytes(b"model")
        outputs.stage(tmp_path / "m.onnx.data", "-o (its .data file)", companion=True).write_bytes(b"data")
        outputs.promote()
    assert order == ["m.onnx.data", "m.onnx"]


def test_two_outputs_on_one_path_are_refused(tmp_path):
    with OutputSet() as outputs:
        outputs.check(tmp_path / "x.json", "-o")
        with pytest.raises(UsageError, match=r"--report .*x.json is the same path as -o; choose"):
            outputs.check(tmp_path / "." / "x.json", "--report")


def test_promotion_failure_is_one_line(tmp_path):
    target = tmp_path / "taken"
    with OutputSet() as outputs:
        outputs.write_text(target, "x")
        target.mkdir()  # a directory appeared meanwhile: the rename fails
        (target / "keep").write_text("")
        with pytest.raises(RuntimeFailure, match="could not write"):
            outputs.promote()
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize(("input_mode", "expected"), [(0o600, 0o600), (0o640, 0o640), (0o644, 0o644)])
def test_mode_follows_the_input(tmp_path, input_mode, expected):
    source = tmp_path / "m.onnx"
    source.write_bytes(b"")
    source.chmod(input_mode)
    assert output_mode([source]) == expected & ~_umask()
    assert output_mode() == 0o666 & ~_umask()


# --- compress: -o, its .data and --report ------------------------------------------------------------------


@pytest.fixture
def external(monkeypatch):
    """Every output model gets an external .data file."""
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 100)


def test_model_and_data_are_written_together(tmp_path, external):
    source = _model(tmp_path / "net.onnx")
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    assert main(["compress", str(source), "--rank", "8", "-o", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    check_model(onnx.load(out))
    feeds = feeds_for(onnx.load(source))
    assert run(out, feeds)[0].shape == run(source, feeds)[0].shape


def test_failed_gate_keeps_the_earlier_model_and_its_data(tmp_path, external, capsys):
    """An earlier good OUT.onnx must never point into a replaced OUT.data; no orphan, no temporary."""
    source = _model(tmp_path / "net.onnx")
    out = tmp_path / "small.onnx"
    argv = ["compress", str(source), "-o", str(out), "--device", "cpu"]
    assert main([*argv, "--rank", "8"]) == 0
    before = _snapshot(tmp_path)
    assert main([*argv, *GATE_FAILS, "--report", str(tmp_path / "r.json")]) == 3
    assert "not written" in capsys.readouterr().err
    after = _snapshot(tmp_path)
    assert after.pop("r.json")  # the verdict is written; the model pair is as it was
    assert after == before


def test_failed_gate_in_an_empty_directory_leaves_no_data_file(tmp_path, external):
    source = _model(tmp_path / "net.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["compress", str(source), "-o", str(out_dir / "small.onnx"), "--device", "cpu", *GATE_FAILS]
    assert main(argv) == 3
    assert list(out_dir.iterdir()) == []


def test_error_after_saving_promotes_nothing(tmp_path, external, monkeypatch):
    import lrdeploy.api

    source = _model(tmp_path / "net.onnx")
    report = tmp_path / "r.json"

    def broken(*args, **kwargs):
        raise RuntimeFailure("onnxruntime crashed")

    monkeypatch.setattr(lrdeploy.api, "_verify", broken)
    before = _snapshot(tmp_path)
    with pytest.raises(RuntimeFailure):
        lrdeploy.compress(source, rank=4, output=tmp_path / "small.onnx", report=report)
    assert _snapshot(tmp_path) == before


def test_output_modes_follow_a_private_input(tmp_path, external):
    source = _model(tmp_path / "net.onnx")
    source.chmod(0o600)
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    argv = ["compress", str(source), "--rank", "8", "-o", str(out), "--report", str(report)]
    assert main([*argv, "--device", "cpu"]) == 0
    for path in (out, out.with_name("small.onnx.data"), report):
        assert oct(path.stat().st_mode & 0o777) == oct(0o600 & ~_umask()), path


def test_a_proto_input_gets_the_umask_mode(tmp_path, rng):
    model = onnx.load(_model(tmp_path / "net.onnx"))
    out = tmp_path / "small.onnx"
    lrdeploy.compress(model, rank=8, output=out, verify=False)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_api_report_is_written_with_the_model(tmp_path):
    source = _model(tmp_path / "net.onnx")
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    lrdeploy.compress(source, rank=8, output=out, report=report, device="cpu")
    data = json.loads(report.read_text())
    assert data["output"] == str(out) and data["timings_s"]["save"] >= 0


# --- no output names a file the model reads ----------------------------------------------------------------


@pytest.fixture
def external_input(tmp_path, monkeypatch):
    """net.onnx with its weights in weights.bin; the working directory holds both."""
    monkeypatch.chdir(tmp_path)
    model = onnx.load(_model(tmp_path / "plain.onnx"))
    path = tmp_path / "net.onnx"
    onnx.save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "other.onnx").write_bytes((tmp_path / "plain.onnx").read_bytes())
    return tmp_path


@pytest.mark.parametrize(
    "argv",
    [
        ["compress", "net.onnx", "--rank", "4", "-o", "weights.bin"],
        ["compress", "net.onnx", "--rank", "4", "--report", "weights.bin"],
        ["inspect", "net.onnx", "--json", "weights.bin"],
        ["verify", "other.onnx", "net.onnx", "--json", "weights.bin"],
        ["verify", "net.onnx", "other.onnx", "--json", "weights.bin"],
        ["bench", "other.onnx", "net.onnx", "--json", "weights.bin"],
    ],
    ids=["compress-o", "compress-report", "inspect-json", "verify-json-2", "verify-json-1", "bench-json"],
)
def test_no_output_replaces_the_inputs_external_data(capsys, external_input, argv):
    before = _snapshot(external_input)
    line = _error(capsys, argv)
    assert "weights.bin is a file the input model reads; choose another path" in line
    assert _snapshot(external_input) == before


def test_plot_on_the_inputs_external_data_is_refused(capsys, external_input):
    pytest.importorskip("matplotlib")
    data = external_input / "weights.png"
    (external_input / "weights.bin").rename(data)
    model = onnx.load(external_input / "net.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "weights.png"
    onnx.save(model, external_input / "net.onnx")
    before = _snapshot(external_input)
    line = _error(capsys, ["bench", "net.onnx", "--plot", "weights.png"])
    assert "--plot weights.png is a file the input model reads" in line
    assert _snapshot(external_input) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-o", "x.onnx", "--report", "x.onnx"], "--report x.onnx is the same path as -o;"),
        (["-o", "x.onnx", "--report", "x.onnx.data"], "is the same path as -o (its .data file)"),
    ],
)
def test_report_on_the_output_names_the_right_reason(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    _model(tmp_path / "net.onnx")
    before = _snapshot(tmp_path)
    line = _error(capsys, ["compress", "net.onnx", "--rank", "4", *argv])
    assert message in line and "the input model reads" not in line
    assert _snapshot(tmp_path) == before
