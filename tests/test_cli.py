"""The command line (lrdeploy/cli/app.py), run in-process through ``main`` and once as a real process:
one-line errors with exit code 2 for usage errors, no traceback, the input untouched."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from lrdeploy.cli.app import main
from models import check_model, graph_model, parse, weight


def _model(path: Path, *, opset: int = 17, ir_version: int = 10, seq: bool = False) -> Path:
    rng = np.random.default_rng(0)
    shape = ["batch", "seq", 32] if seq else ["batch", 32]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
    ]
    params = {"W1": weight(rng, 32, 32), "W2": weight(rng, 32, 10)}
    out_shape = [*shape[:-1], 10]
    onnx.save(
        graph_model(nodes, {"x": shape}, {"y": out_shape}, params, opset=opset, ir_version=ir_version), path
    )
    return path


@pytest.fixture
def model_path(tmp_path) -> Path:
    return _model(tmp_path / "net.onnx")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error(capsys, argv: list[str], code: int = 2) -> str:
    """Run and return the one error line; check the exit code and that nothing else went to stderr."""
    assert main(argv) == code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def _assert_untouched(directory: Path, before: dict[str, str]) -> None:
    assert _snapshot(directory) == before


def _snapshot(directory: Path) -> dict[str, str]:
    return {p.name: _digest(p) if p.is_file() else "dir" for p in directory.iterdir()}


def test_missing_file(capsys, tmp_path):
    line = _error(capsys, ["compress", str(tmp_path / "nope.onnx"), "--rank-ratio", "0.5"])
    assert "nope.onnx" in line and "no such file" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "payload", [b"", b"name,value\n1,2\n", bytes(range(256))], ids=["empty", "csv", "bytes"]
)
def test_not_onnx(capsys, tmp_path, payload):
    path = tmp_path / "data.onnx"
    path.write_bytes(payload)
    before = _snapshot(tmp_path)
    line = _error(capsys, ["compress", str(path), "--rank-ratio", "0.5"])
    assert "is not an ONNX model" in line
    _assert_untouched(tmp_path, before)


def test_old_opset_is_converted_and_said(capsys, tmp_path):
    path = _model(tmp_path / "old.onnx", opset=9, ir_version=4)
    before = _digest(path)
    out = tmp_path / "old.small.onnx"
    assert main(["compress", str(path), "--rank-ratio", "0.5", "-o", str(out)]) == 0
    assert "opset 9 converted to 13" in capsys.readouterr().out
    assert _digest(path) == before
    check_model(onnx.load(out))


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.25", "nan"])
def test_rank_ratio_outside_unit_interval(capsys, tmp_path, model_path, ratio):
    before = _snapshot(tmp_path)
    line = _error(capsys, ["compress", str(model_path), "--rank-ratio", ratio])
    assert "rank ratio must be in (0, 1]" in line
    _assert_untouched(tmp_path, before)


def test_unknown_input_shape_name(capsys, tmp_path, model_path):
    before = _snapshot(tmp_path)
    line = _error(capsys, ["compress", str(model_path), "--rank-ratio", "0.5", "--input-shape", "image:1,32"])
    assert "unknown input 'image'" in line and "x" in line
    _assert_untouched(tmp_path, before)


def test_symbolic_dim_needs_input_shape(capsys, tmp_path):
    path = _model(tmp_path / "seq.onnx", seq=True)
    before = _snapshot(tmp_path)
    line = _error(capsys, ["compress", str(path), "--rank-ratio", "0.5"])
    assert "dim 1 (seq)" in line and "--input-shape x:" in line
    _assert_untouched(tmp_path, before)
    out = tmp_path / "seq.small.onnx"
    argv = ["compress", str(path), "--rank-ratio", "0.5", "--input-shape", "x:2,5,32", "-o", str(out)]
    assert main(argv) == 0
    check_model(onnx.load(out))


@pytest.mark.parametrize("spelling", ["same", "dotted"])
def test_output_equal_to_input(capsys, tmp_path, model_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    target = str(model_path) if spelling == "same" else "./net.onnx"
    line = _error(capsys, ["compress", "net.onnx", "--rank-ratio", "0.5", "-o", target])
    assert "is a file the input model reads" in line
    _assert_untouched(tmp_path, before)


def test_output_over_the_inputs_external_data_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = onnx.load(_model(tmp_path / "net.onnx"))
    onnx.save(model, "ext.onnx", save_as_external_data=True, location="ext.weights", size_threshold=0)
    before = _snapshot(tmp_path)
    line = _error(capsys, ["compress", "ext.onnx", "--rank-ratio", "0.5", "-o", "ext.weights"])
    assert "-o ext.weights is a file the input model reads" in line
    _assert_untouched(tmp_path, before)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "net.onnx", "--rank-ratio", "0.5", "-o", "adir"], "-o adir is a directory"),
        (["compress", "net.onnx", "--rank-ratio", "0.5", "-o", "afile/x.onnx"], "afile is a file, not a dir"),
        (["compress", "net.onnx", "--rank-ratio", "0.5", "--report", "no/r.json"], "directory no does not"),
        (["compress", "net.onnx", "--rank-ratio", "0.5", "--report", "net.onnx"], "the input model reads"),
        (
            ["compress", "net.onnx", "--rank-ratio", "0.5", "-o", "o.onnx", "--report", "o.onnx"],
            "--report o.onn",
        ),
        (["inspect", "net.onnx", "--json", "net.onnx"], "--json net.onnx is a file the input model reads"),
        (["verify", "net.onnx", "afile", "--json", "afile"], "--json afile is a file the input model reads"),
        (["bench", "net.onnx", "--json", "net.onnx"], "--json net.onnx is a file the input model reads"),
        (["bench", "net.onnx", "./net.onnx"], "a model is given twice"),
        (["bench", "net.onnx", "--plot", "latency"], "--plot latency: give a file name ending in one of"),
    ],
)
def test_output_paths_are_checked_before_any_work(capsys, tmp_path, model_path, monkeypatch, argv, message):
    """JSON, plots and models never replace an input or each other, and a bad path fails up front."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("not a directory")
    before = _snapshot(tmp_path)
    assert message in _error(capsys, argv)
    assert _snapshot(tmp_path) == before  # no output, no temporary file, the input as it was


def test_no_arguments_prints_help_without_an_empty_error(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "compress" in captured.out and "error" not in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rank-ratio", "0.5", "--energy", "0.9"], "only one of"),
        ([], "choose a rank policy"),
        (["--rank", "0"], "positive integer"),
        (["--rank-ratio", "0.5", "--rank-multiple", "0"], "rank multiple"),
        (["--rank-ratio", "0.5", "--input-shape", "x"], "NAME:d0,d1"),
        (["--rank-ratio", "0.5", "--input-shape", "x:1"], "has 1 dims"),
        (["--rank-ratio", "0.5", "--overrides", "missing.json"], "does not exist"),
        (["--rank-ratio", "0.5", "-o", "nowhere/out.onnx"], "does not exist"),
        (["--rank-ratio", "abc"], "--rank-ratio"),
        (["--energy", "2"], "energy must be in (0, 1]"),
    ],
)
def test_other_usage_errors(capsys, tmp_path, model_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    line = _error(capsys, ["compress", "net.onnx", *argv])
    assert message in line
    _assert_untouched(tmp_path, before)


def test_overrides_file(capsys, tmp_path, model_path):
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"fc1": 2}))
    out = tmp_path / "small.onnx"
    argv = ["compress", str(model_path), "--overrides", str(ranks), "-o", str(out), "--no-verify"]
    assert main(argv) == 0
    assert [n.op_type for n in onnx.load(out).graph.node] == ["MatMul", "MatMul", "Relu", "MatMul"]
    capsys.readouterr()
    ranks.write_text(json.dumps({"fc_1": 2}))
    out.unlink()
    before = _snapshot(tmp_path)
    line = _error(capsys, argv)
    assert "'fc_1', which is not a factorizable layer" in line and "fc1, fc2" in line
    _assert_untouched(tmp_path, before)


def test_compress_writes_output_and_report(capsys, tmp_path, model_path):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    argv = ["compress", str(model_path), "--rank-ratio", "0.25", "-o", str(out), "--report", str(report)]
    assert main([*argv, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "fc1" in captured.out and "factorized" in captured.out
    check_model(onnx.load(out))
    data = json.loads(report.read_text())
    for key in ("params_before", "params_after", "macs_before", "macs_after", "layers", "verification"):
        assert key in data
    assert data["params_before"] == 32 * 32 + 32 * 10
    # ranks: round(0.25·32) = 8 and round-half-up(0.25·10) = 3
    assert data["params_after"] == 8 * 64 + 3 * 42
    assert data["macs_before"] == 32 * 32 + 32 * 10 and data["macs_after"] == 8 * 64 + 3 * 42
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert set(layers) == {"fc1", "fc2"}
    for layer in layers.values():
        for key in ("name", "op", "status", "reason", "rank", "full_rank", "energy_kept"):
            assert key in layer
    assert (layers["fc1"]["status"], layers["fc1"]["rank"], layers["fc1"]["full_rank"]) == (
        "factorized",
        8,
        32,
    )
    assert 0 < layers["fc1"]["energy_kept"] < 1
    verification = data["verification"]
    for key in ("provider", "max_abs_diff", "rel_l2", "cosine", "top1_agreement"):
        assert key in verification
    assert verification["provider"] == "CPUExecutionProvider"
    assert 0 < verification["rel_l2"] < 1.5 and -1 <= verification["cosine"] <= 1


def test_default_output_path_and_no_verify(capsys, model_path):
    assert main(["compress", str(model_path), "--rank", "4", "--no-verify"]) == 0
    out = model_path.with_name("net.lowrank.onnx")
    check_model(onnx.load(out))
    assert "verified" not in capsys.readouterr().out


def test_inspect_prints_a_table(capsys, model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    profile = tmp_path / "profile.json"
    assert main(["inspect", str(model_path), "--json", str(profile)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "fc1" in line or "fc2" in line]
    assert len(rows) == 2
    assert "MatMul" in rows[0] and "32×32" in rows[0] and "%" in rows[0]
    assert "32×10" in rows[1] and "10×32" in rows[1]
    data = json.loads(profile.read_text())
    assert [layer["names"] for layer in data["layers"]] == [["fc1"], ["fc2"]]
    assert len(data["layers"][0]["singular_values"]) == 32
    assert data["layers"][1]["break_even_rank"] == (32 * 10 - 1) // 42


def test_inspect_table_is_readable_when_piped(capsys, model_path, monkeypatch):
    """Piped output (CI logs, `| less`): rich would assume 80 columns and truncate cells to 'Mat…'."""
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["inspect", str(model_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "fc1" in line)
    assert "MatMul" in row and "32×32" in row and "…" not in row


@pytest.mark.parametrize("columns", ["150", None])
def test_piped_width_is_taken_at_every_call(capsys, model_path, monkeypatch, columns):
    """rich fixes a console's width from COLUMNS when it is made: a console made under COLUMNS=40 (an
    import in an earlier test, or an earlier call in a long-lived process) must not narrow a later call."""
    from rich.console import Console

    from lrdeploy.cli import app as cli

    monkeypatch.setattr(cli, "console", Console(width=40))  # not a terminal: stdout is captured
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert main(["inspect", str(model_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "fc1" in line)
    assert "MatMul" in row and "32×32" in row and "…" not in row
    assert cli.console.width == (int(columns) if columns else cli.PIPED_WIDTH)


def test_inspect_errors(capsys, tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_text("not a model")
    assert "is not an ONNX model" in _error(capsys, ["inspect", str(path)])


def test_subprocess_prints_one_line_and_no_traceback(tmp_path):
    """The installed entry point, as a shell runs it."""
    path = tmp_path / "text.onnx"
    path.write_text("hello\n")
    code = "from lrdeploy.cli.app import run; run()"
    for argv, expected in (
        (["compress", str(path), "--rank-ratio", "0.5"], "is not an ONNX model"),
        (["compress", str(tmp_path / "missing.onnx"), "--rank-ratio", "0.5"], "no such file"),
        (["compress", str(path), "--rank-ratio", "2"], "rank ratio must be in"),
    ):
        result = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], result.stderr
    assert path.read_text() == "hello\n"


def test_brackets_in_messages_are_printed_not_taken_as_markup(tmp_path, capsys):
    """rich reads '[batch, seq]' as a style tag and drops it; messages carry shapes like that."""
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[batch, seq] x) => (float[batch, seq] y) { y = Relu(x) }
        """
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["compress", str(path), "--rank-ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "'x' [batch, seq]" in err and "--input-shape x:1,64 with 64 replaced by the real size" in err


def test_version(capsys):
    from lrdeploy import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lrdeploy {__version__}"


def test_plot_without_matplotlib_fails_before_any_work(capsys, tmp_path, model_path, monkeypatch):
    import lrdeploy.runtime.bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(lrdeploy.runtime.bench, "benchmark", lambda *a, **k: pytest.fail("benchmarked first"))
    before = _snapshot(tmp_path)
    line = _error(capsys, ["bench", str(model_path), "--plot", str(tmp_path / "p.png")])
    assert "--plot needs matplotlib: pip install 'lrdeploy[plot]'" in line
    assert _snapshot(tmp_path) == before


def test_image_folder_without_pillow_fails_before_any_work(capsys, tmp_path, model_path, monkeypatch):
    import lrdeploy.api

    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setattr(lrdeploy.api, "compress", lambda *a, **k: pytest.fail("compressed first"))
    (tmp_path / "images").mkdir()
    line = _error(capsys, ["compress", str(model_path), "--rank", "4", "--data", str(tmp_path / "images")])
    assert "--data with an image folder needs Pillow: pip install 'lrdeploy[images]'" in line


@pytest.mark.parametrize("command", ["compress", "inspect", "verify", "bench"])
def test_every_command_takes_format(capsys, tmp_path, model_path, command):
    argv = {
        "compress": ["compress", str(model_path), "--rank", "4", "--no-verify"],
        "inspect": ["inspect", str(model_path)],
        "verify": ["verify", str(model_path), str(model_path), "--device", "cpu"],
        "bench": ["bench", str(model_path), "--runs", "1", "--warmup", "0"],
    }[command]
    assert main([*argv, "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert isinstance(json.loads(captured.out), dict)  # stdout is the document; remarks go to stderr
    assert main([*argv, "--format", "yaml"]) == 2


def test_compress_with_a_budget_and_calibration(capsys, tmp_path, model_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((20, 32)).astype(np.float32))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    argv = ["compress", str(model_path), "-o", str(out), "--report", str(report), "--format", "plain"]
    argv += [
        "--target-params",
        "0.5",
        "--calib",
        str(calib),
        "--calib-samples",
        "15",
        "--calib-holdout",
        "0.2",
    ]
    assert main([*argv, "--allocate", "sensitivity", "--method", "whiten"]) == 0
    printed = capsys.readouterr().out
    assert "budget: 0.5 of the params asked" in printed and "calibration: calib.npz" in printed
    data = json.loads(report.read_text())
    assert data["budget"]["allocator"] == "sensitivity" and data["calibration"]["samples"] == 15
    assert 0.49 <= data["params_after"] / data["params_before"] <= 0.5
    check_model(onnx.load(out))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--target-macs", "0.5", "--rank-ratio", "0.5"],
            "--target-macs chooses every rank itself; drop --rank-ratio",
        ),
        (["--target-macs", "0.5", "--target-params", "0.5"], "only one of --target-params, --target-macs"),
        (["--target-params", "1.2"], r"--target-params must be a fraction of the model in \(0, 1\]"),
        (
            ["--rank-ratio", "0.5", "--method", "whiten"],
            "--method whiten needs calibration data: add --calib",
        ),
        (["--target-macs", "0.5", "--allocate", "sensitivity"], "--allocate sensitivity measures"),
        (["--target-params", "0.001"], "--target-params 0.001 is out of reach"),
        (["--rank-ratio", "0.5", "--calib", "nowhere.npz"], "no such file"),
    ],
)
def test_budget_flag_errors(capsys, tmp_path, model_path, flags, message):
    line = _error(capsys, ["compress", str(model_path), "-o", str(tmp_path / "o.onnx"), *flags])
    assert re.search(message, line), line


def test_inspect_with_calibration_shows_output_errors(capsys, tmp_path, model_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((12, 32)).astype(np.float32))
    profile = tmp_path / "profile.json"
    argv = ["inspect", str(model_path), "--calib", str(calib), "--json", str(profile), "--format", "plain"]
    assert main(argv) == 0
    assert "out err @25% svd→whiten" in capsys.readouterr().out
    layer = json.loads(profile.read_text())["layers"][0]
    errors = layer["output_rel_error"]
    assert errors["rank_ratios"] == [0.1, 0.25, 0.5]
    assert all(w <= s + 1e-9 for s, w in zip(errors["svd"], errors["whiten"], strict=True))


def test_policy_errors_name_parameters_in_python_and_flags_on_the_command_line(tmp_path, capsys):
    from lrdeploy.config import CompressConfig
    from lrdeploy.errors import UsageError

    with pytest.raises(UsageError, match=r"^give only one of rank_ratio, energy, rank$"):
        CompressConfig.build(rank_ratio=0.5, energy=0.9)
    with pytest.raises(UsageError, match=r"choose a rank policy: rank_ratio, energy, rank"):
        CompressConfig.build()
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    assert main(["compress", str(path), "--rank-ratio", "0.5", "--energy", "0.9"]) == 2
    assert "give only one of --rank-ratio, --energy, --rank" in capsys.readouterr().err
