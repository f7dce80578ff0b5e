"""onnx's full check of written outputs (issue 12): also with verification off, an output that fails it is
an error when the input passes (nothing written), a one-line warning when the input fails it too."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import lrdeploy
import lrdeploy.api as api
from lrdeploy.cli.app import main
from lrdeploy.errors import RuntimeFailure
from lrdeploy.io.modelcheck import checker_problem
from models import graph_model, weight


def _mlp(rng: np.random.Generator, **relu_attributes: object) -> onnx.ModelProto:
    return graph_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu", **relu_attributes),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        {"x": ["N", 16]},
        {"y": ["N", 10]},
        {"w1": weight(rng, 16, 24), "w2": weight(rng, 24, 10)},
    )


def test_checker_problem_is_one_printable_line(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(rng), path)
    assert checker_problem(path) is None
    bad = _mlp(rng, **{"foo\x1b[2J": 1})
    problem = checker_problem(bad)
    assert problem is not None and "Unrecognized attribute" in problem
    assert "\n" not in problem and "\x1b" not in problem


@pytest.mark.parametrize("verify", [False, True])
def test_an_output_that_fails_the_checker_from_a_valid_input_is_an_error(monkeypatch, tmp_path, rng, verify):
    path, output = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_mlp(rng), path)
    export = api.from_graph

    def broken(*args, **kwargs):  # a stand-in for a bug in a pass: an attribute Relu does not have
        model = export(*args, **kwargs)
        next(n for n in model.graph.node if n.op_type == "Relu").attribute.append(
            helper.make_attribute("foo", 1)
        )
        return model

    monkeypatch.setattr(api, "from_graph", broken)
    with pytest.raises(RuntimeFailure, match="a bug in lrdeploy") as raised:
        lrdeploy.compress(path, rank_ratio=0.5, output=output, report=tmp_path / "r.json", verify=verify)
    assert "Unrecognized attribute: foo for operator Relu" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_an_input_that_fails_the_checker_gives_a_warned_output(tmp_path, rng, capsys):
    path, output = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_mlp(rng, foo=1), path)
    before = path.read_bytes()
    _, report = lrdeploy.compress(path, rank_ratio=0.5, output=output, verify=False)
    warning = (
        "the output fails onnx's checker (Unrecognized attribute: foo for operator Relu); "
        "the input already fails it in the same way: fix the input"
    )
    assert warning in report.notes and output.exists() and path.read_bytes() == before
    assert (
        main(["compress", str(path), "-o", str(tmp_path / "cli.onnx"), "--rank-ratio", "0.5", "--no-verify"])
        == 0
    )
    assert "the input already fails it in the same way" in capsys.readouterr().out


def test_valid_outputs_have_no_checker_note(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(rng), path)
    _, report = lrdeploy.compress(path, rank_ratio=0.5, output=tmp_path / "out.onnx", verify=False)
    assert not any("checker" in note for note in report.notes)
    assert "check" in report.timings


def test_an_input_proto_the_checker_cannot_judge_does_not_excuse_the_output(tmp_path, rng):
    """A proto whose data lives in files it cannot find (no folder given) fails the checker for that
    reason alone: a failing output is then lrdeploy's error, not the input's."""
    from lrdeploy.io.modelcheck import check_output

    bad = tmp_path / "bad.onnx"
    onnx.save(_mlp(rng, **{"unknown": 1}), bad)
    external = _mlp(rng)
    onnx.external_data_helper.set_external_data(external.graph.initializer[0], "elsewhere.bin")
    external.graph.initializer[0].data_location = onnx.TensorProto.EXTERNAL
    external.graph.initializer[0].ClearField("raw_data")
    with pytest.raises(RuntimeFailure, match="could not be checked by itself"):
        check_output(bad, external)
    with pytest.raises(RuntimeFailure, match="although the input passes"):
        check_output(bad, _mlp(rng))
    assert "already fails" in check_output(bad, _mlp(rng, **{"unknown": 1}))
