"""What the commands print (cli/render.py, tables.py, text.py): model strings escaped, tables that fit
80 and 200 columns in every format, long names cut in the middle and still told apart, noise summarized."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper
from rich.cells import cell_len
from rich.console import Console

from lrdeploy.cli import app as cli
from lrdeploy.cli.render import format_shapes, render_report
from lrdeploy.planning.plan import LayerDecision
from lrdeploy.report import LayerReport, Report
from lrdeploy.text import printable, shorten, shorten_all
from models import graph_model, weight

HOSTILE = "x\x1b]0;title\x07\x1b[31m"
BIDI = "evil\u202egnp.exe"
LONG = [f"/encoder/layer.{i}/attention/self/query_projection/MatMul" for i in (10, 11)]
_ANSI = re.compile(r"\x1b\[[?0-9;]*[a-zA-Z]")  # colours, cursor and erase sequences


def _mlp(path, names, input_name="x", dims=("batch",)):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", [input_name, "W1"], ["h"], name=names[0]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name=names[1]),
    ]
    params = {"W1": weight(rng, 32, 32), "W2": weight(rng, 32, 10)}
    model = graph_model(nodes, {input_name: [*dims, 32]}, {"y": [*dims, 10]}, params)
    onnx.save(model, path)
    return path


def _cli(monkeypatch, argv, width=80, terminal=True) -> tuple[int, str, str]:
    """Run the CLI with consoles of this width, on a terminal (colours) or not."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setenv("COLUMNS", str(width))
    for name, handle in (("console", out), ("err_console", err)):
        console = Console(file=handle, width=width, force_terminal=terminal, color_system="standard")
        monkeypatch.setattr(cli, name, console)
    code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _visible_lines(text: str) -> list[str]:
    return [line for line in _ANSI.sub("", text).splitlines() if line]


# --- printable and shorten ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (HOSTILE, "x\\x1b]0;title\\x07\\x1b[31m"),
        ("a\nb\tc\rd\x00", "a\\x0ab\\x09c\\x0dd\\x00"),
        ("del\x7f c1\x9b", "del\\x7f c1\\x9b"),
        (BIDI, "evil\\u202egnp.exe"),
        ("\u2066iso\u2069 \u200fmark", "\\u2066iso\\u2069 \\u200fmark"),
        ("/enc/conv_1×1 → ok, 層", "/enc/conv_1×1 → ok, 層"),
    ],
)
def test_printable_escapes_controls_and_bidi(raw, shown):
    assert printable(raw) == shown


def test_printable_cuts_absurd_names_in_the_middle():
    name = "/a" * 5000 + "/end"
    short = printable(name)
    assert len(short) == 200 and short.startswith("/a/a") and short.endswith("/end") and "…" in short
    assert printable(name, limit=None) == name


def test_shorten_keeps_start_and_end():
    assert shorten("/encoder/layer.3/attention/self/query/MatMul", 30) == "/…/attention/self/query/MatMul"
    assert shorten("/encoder/layer.3/attention/self/query/MatMul", 28) == "/encoder/…/self/query/MatMul"
    assert shorten("encoder.layer.3.attention.self.query.weight", 24) == "encoder.….query.weight"
    assert shorten("short", 30) == "short"


@given(
    st.lists(st.text(alphabet="ab/.", max_size=70), min_size=1, max_size=6),
    st.integers(min_value=8, max_value=60),
)
def test_shortened_names_fit_and_stay_distinct(names, width):
    short = shorten_all(names, width)
    assert all(len(s) <= width for s in short)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert (short[i] == short[j]) == (a == b)


# --- hostile names never reach the terminal raw -----------------------------------------------------------


@pytest.mark.parametrize("command", ["compress", "inspect"])
@pytest.mark.parametrize("fmt", ["table", "plain", "csv"])
def test_hostile_names_are_escaped(tmp_path, monkeypatch, command, fmt):
    model = _mlp(tmp_path / "m.onnx", [HOSTILE, BIDI])
    argv = [command, str(model), "--format", fmt]
    if command == "compress":
        argv += ["--rank", "4", "--device", "cpu", "--report", str(tmp_path / "r.json")]
    code, out, err = _cli(monkeypatch, argv)
    assert code == 0, err
    for raw in ("\x1b]", "\x07", "\u202e"):
        assert raw not in out + err
    assert "\\x1b]0;title\\x07" in out and "\\u202e" in out
    if command == "compress":  # JSON keeps names exact
        layers = json.loads((tmp_path / "r.json").read_text())["layers"]
        assert [layer["name"] for layer in layers] == [HOSTILE, BIDI]


def test_hostile_input_name_in_an_error_is_escaped(tmp_path, monkeypatch):
    hostile = "in\x1b[2J\nfake line"
    model = _mlp(tmp_path / "m.onnx", ["fc1", "fc2"], input_name=hostile, dims=("batch", "seq"))
    code, _, err = _cli(monkeypatch, ["compress", str(model), "--rank", "4"])
    assert code == 2
    lines = _visible_lines(err)
    assert len(lines) == 1 and "\x1b[2J" not in err
    assert "in\\x1b[2J\\x0afake line" in lines[0]


def test_json_format_keeps_names_exact(tmp_path, monkeypatch):
    model = _mlp(tmp_path / "m.onnx", [HOSTILE, BIDI])
    code, out, err = _cli(monkeypatch, ["inspect", str(model), "--format", "json"], terminal=False)
    assert code == 0, err
    assert [layer["names"] for layer in json.loads(out)["layers"]] == [[HOSTILE], [BIDI]]


# --- every format at 80 and 200 columns --------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_models(tmp_path_factory):
    """Two models whose layer names differ only in the middle, the second compressed from the first."""
    directory = tmp_path_factory.mktemp("long")
    original = _mlp(directory / "a_model_with_a_rather_long_file_name_for_the_baseline.onnx", LONG)
    small = directory / "a_model_with_a_rather_long_file_name_for_the_lowrank.onnx"
    assert cli.main(["compress", str(original), "--rank", "4", "-o", str(small), "--no-verify"]) == 0
    return original, small


def _argv(command, original, small, tmp):
    return {
        "compress": ["compress", str(original), "--rank", "4", "--device", "cpu", "-o", str(tmp / "o.onnx")],
        "inspect": ["inspect", str(original)],
        "verify": ["verify", str(original), str(small), "--device", "cpu"],
        "bench": ["bench", str(original), str(small), "--device", "cpu", "--runs", "1", "--warmup", "0"],
    }[command]


def _name_cells(lines: list[str], fmt: str) -> list[str]:
    if fmt == "table":
        return [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    return [line.split("  ")[0] for line in lines if line.startswith("/")]  # names and paths


@pytest.mark.parametrize("width", [80, 200])
@pytest.mark.parametrize("fmt", ["table", "plain", "csv", "json"])
@pytest.mark.parametrize("command", ["compress", "inspect", "verify", "bench"])
def test_formats_fit_the_width(tmp_path, monkeypatch, long_models, command, fmt, width):
    original, small = long_models
    argv = [*_argv(command, original, small, tmp_path), "--format", fmt]
    code, out, err = _cli(monkeypatch, argv, width=width, terminal=fmt == "table")
    assert code == 0, err
    lines = _visible_lines(out)
    if fmt == "json":
        assert isinstance(json.loads(out), dict)
        return
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(out)))
        names = {row[0] for row in rows[1:]}
        expected = {"compress": LONG, "inspect": LONG, "verify": ["y"], "bench": [str(original), str(small)]}
        assert set(expected[command]) <= names
        return
    too_wide = [line for line in lines if cell_len(line) > width]
    assert not too_wide, "\n".join(too_wide)
    if command in ("compress", "inspect", "bench"):
        cells = [c for c in _name_cells(lines, fmt) if c not in ("total", "")]
        assert len(cells) >= 2 and len(set(cells)) == len(cells), cells


def test_piped_output_is_plain_by_default(tmp_path, monkeypatch, long_models):
    code, out, _ = _cli(monkeypatch, ["inspect", str(long_models[0])], width=200, terminal=False)
    assert code == 0
    assert "│" not in out and "\x1b[" not in out
    assert any(line.startswith(LONG[0]) for line in out.splitlines())


def test_unknown_format_is_a_usage_error(tmp_path, monkeypatch, long_models):
    code, _, err = _cli(monkeypatch, ["inspect", str(long_models[0]), "--format", "xml"])
    assert code == 2 and "--format expects one of table, plain, csv, json" in err


# --- noise: attention MatMuls, shared weights, shapes ------------------------------------------------------


def test_attention_matmuls_are_one_summary_line(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"], name="query"),
        helper.make_node("Transpose", ["q"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("MatMul", ["s", "q"], ["y"], name="context"),
    ]
    path = tmp_path / "attn.onnx"
    onnx.save(graph_model(nodes, {"x": [1, 4, 16]}, {"y": [1, 4, 16]}, {"Wq": weight(rng, 16, 16)}), path)
    code, out, err = _cli(monkeypatch, ["compress", str(path), "--rank", "4", "--no-verify"], 200, False)
    assert code == 0, err
    assert "2 MatMuls of two activations (attention): nothing to factorize" in out
    assert "scores" not in out and "context" not in out and "computed at run time" not in out
    code, out, err = _cli(monkeypatch, ["inspect", str(path)], 200, False)
    assert "2 MatMuls of two activations (attention)" in out and "scores" not in out


def _report(decisions: list[LayerDecision]) -> Report:
    return Report(
        input="m.onnx",
        output=None,
        config="rank 4",
        opset=17,
        ir_version=(10, 10),
        input_shapes={"input": [1, 3, 64, 64], "mask": None},
        params_before=2048,
        params_after=512,
        macs_before=2048,
        macs_after=512,
        layers=[LayerReport(d, 1024, 256) for d in decisions],
        batchnorm=[],
        normalized=[],
    )


def test_shared_rows_point_to_the_primary_and_shapes_read_as_shapes():
    common = dict(op="MatMul", status="factorized", reason="", m=32, n=32, rank=4, full_rank=32)
    primary = LayerDecision("/lstm/gemm_0", **common)
    shared = LayerDecision("/lstm/gemm_1", **common)
    object.__setattr__(shared, "shared_primary", "/lstm/gemm_0")  # the planner's field, when it lands
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    render_report(_report([primary, shared]), console, "plain")
    out = console.file.getvalue()
    row = next(line for line in out.splitlines() if line.startswith("/lstm/gemm_1"))
    assert "shared (1)" in row and "factorized" not in row
    assert "(1) shares its weight with /lstm/gemm_0, whose row counts the saving" in out
    assert "at input 1×3×64×64, mask (unknown)" in out and "{" not in out


def test_format_shapes():
    assert format_shapes({"input_ids": [1, 128], "pixels": [2, 3, 8, 8]}) == "input_ids 1×128, pixels 2×3×8×8"
