"""Inputs random data cannot drive (runtime/feeding.py, inputs.py, datasets.py, verification.py, sessions.py):
``--input-value`` constants, indices within a table, scalar and batch-on-axis-1 data inputs, and
onnxruntime failures as one quiet line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from control_flow import H, audio_if_model
from onnx import TensorProto, helper

import lrdeploy
from lrdeploy.cli.app import main
from lrdeploy.errors import RuntimeFailure, UsageError
from lrdeploy.runtime.datasets import load_dataset
from lrdeploy.runtime.feeding import batch_axes, parse_batch_axes, parse_input_values
from lrdeploy.runtime.inputs import model_inputs, random_feeds
from lrdeploy.runtime.sessions import summarize
from lrdeploy.runtime.verification import VerifyConfig, verify
from models import IR_VERSION


def test_parse_input_values_and_batch_axes():
    assert parse_input_values(["sr=16000", "gain=0.5", "a=b=1"]) == {"sr": 16000, "gain": 0.5, "a=b": 1}
    assert isinstance(parse_input_values(["sr=16000"])["sr"], int)
    assert parse_batch_axes(["state:1", "ns:x:0"]) == {"state": 1, "ns:x": 0}
    for bad in (["sr"], ["sr=x"], ["=1"], ["sr=nan"]):
        with pytest.raises(UsageError, match="--input-value expects NAME=NUMBER"):
            parse_input_values(bad)
    for bad in (["state"], ["state:-1"], ["state:a"], [":1"]):
        with pytest.raises(UsageError, match="--batch-axis expects NAME:AXIS"):
            parse_batch_axes(bad)


def test_a_value_is_broadcast_to_the_input_shape_and_type():
    model = audio_if_model()
    shapes = {"x": (2, 4, 20), "sr": (), "state": (2, 2, H)}
    feeds = random_feeds(model, shapes, values={"sr": 16000, "x": 0.25})
    assert feeds["sr"].shape == () and feeds["sr"].dtype == np.int64 and feeds["sr"] == 16000
    assert feeds["x"].shape == (2, 4, 20) and np.all(feeds["x"] == 0.25)
    assert feeds["state"].std() > 0.5  # still random


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sr": 0.5}, "input 'sr' is int64, which cannot hold 0.5"),
        ({"rate": 1}, "unknown input 'rate' in input_values; the model's inputs are: sr, state, x"),
    ],
)
def test_bad_values_are_refused_in_one_line(values, message):
    with pytest.raises(UsageError) as error:
        lrdeploy.compress(audio_if_model(), rank_ratio=0.5, input_values=values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_values_must_be_numbers():
    with pytest.raises(UsageError, match="expected a finite number"):
        VerifyConfig(input_values={"sr": "16000"})
    with pytest.raises(UsageError, match="expected an axis ≥ 0"):
        VerifyConfig(batch_axes={"state": -1})


def _embedding_model(through_cast: bool) -> onnx.ModelProto:
    table = helper.make_tensor("table", TensorProto.FLOAT, [7, 4], np.arange(28, dtype=np.float32))
    nodes = []
    ids = "ids"
    if through_cast:
        nodes.append(helper.make_node("Cast", ["ids"], ["ids32"], "cast", to=TensorProto.INT32))
        nodes.append(helper.make_node("Unsqueeze", ["ids32", "axes"], ["ids_u"], "unsq"))
        ids = "ids_u"
    nodes.append(helper.make_node("Gather", ["table", ids], ["y"], "lookup"))
    graph = helper.make_graph(
        nodes,
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 50])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [table, helper.make_tensor("axes", TensorProto.INT64, [1], [0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


@pytest.mark.parametrize("through_cast", [False, True])
def test_indices_into_a_table_stay_within_it(through_cast):
    feeds = random_feeds(_embedding_model(through_cast), {"ids": (1, 50)}, seed=1)
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 7 and feeds["ids"].max() > 1


def test_batch_axis_comes_from_the_batch_symbol():
    specs = model_inputs(audio_if_model())
    assert batch_axes(specs) == {"x": 0, "sr": None, "state": 1}
    assert batch_axes(specs, {"state": 2})["state"] == 2
    with pytest.raises(UsageError, match="input 'state' has 3 dims"):
        batch_axes(specs, {"state": 3})
    with pytest.raises(UsageError, match="unknown input 'h'"):
        batch_axes(specs, {"h": 0})


def _audio_arrays(count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((count, 4, 20)).astype(np.float32),
        "sr": np.array(16000),
        "state": rng.standard_normal((2, count, H)).astype(np.float32),
    }


def test_scalar_and_axis_one_inputs_are_batched_right(tmp_path):
    arrays = _audio_arrays(5)
    np.savez(tmp_path / "a.npz", **arrays)
    dataset = load_dataset(tmp_path / "a.npz", audio_if_model(), limit=4)
    assert len(dataset) == 4
    batches = list(dataset.batches(3))
    assert [b["state"].shape for b in batches] == [(2, 3, H), (2, 1, H)]
    assert [b["x"].shape for b in batches] == [(3, 4, 20), (1, 4, 20)]
    assert all(b["sr"].shape == () and b["sr"] == 16000 for b in batches)
    np.testing.assert_array_equal(batches[1]["state"], arrays["state"][:, 3:4])


def test_a_missing_input_takes_its_value_per_batch(tmp_path):
    arrays = _audio_arrays(5)
    del arrays["sr"]
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(UsageError, match=r"has no array for input\(s\) \['sr'\].*given with input_values"):
        load_dataset(tmp_path / "a.npz", audio_if_model())
    dataset = load_dataset(tmp_path / "a.npz", audio_if_model(), values={"sr": 8000})
    assert [b["sr"].item() for b in dataset.batches(2)] == [8000] * 3


def test_given_batch_axis_wins(tmp_path):
    arrays = _audio_arrays(4)
    arrays["state"] = np.ascontiguousarray(arrays["state"].transpose(1, 0, 2))  # [batch, 2, H]
    np.savez(tmp_path / "a.npz", **arrays)
    wrong = r"dim 0 is 2 in the model but 4 in the data \(its batch axis is 1; batch_axes sets another"
    with pytest.raises(UsageError, match=wrong):
        load_dataset(tmp_path / "a.npz", audio_if_model())
    dataset = load_dataset(tmp_path / "a.npz", audio_if_model(), axes={"state": 0})
    assert next(dataset.batches(3))["state"].shape == (3, 2, H)


def test_a_scalar_for_a_batched_input_is_refused(tmp_path):
    arrays = _audio_arrays(3)
    arrays["x"] = np.array(1.0, dtype=np.float32)
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(UsageError, match="'x' is a scalar but the model's input has 3 dims"):
        load_dataset(tmp_path / "a.npz", audio_if_model())


def test_verify_cli_takes_input_value_and_batch_axis(tmp_path, capsys):
    path = tmp_path / "audio.onnx"
    onnx.save(audio_if_model(), path)
    arrays = _audio_arrays(6)
    del arrays["sr"]
    np.savez(tmp_path / "a.npz", **arrays)
    argv = ["verify", str(path), str(path), "--data", str(tmp_path / "a.npz"), "--atol", "0"]
    assert main(argv) == 2
    assert "(a constant input can be given with --input-value)" in capsys.readouterr().err
    argv += ["--input-value", "sr=16000"]
    assert main([*argv, "--batch-axis", "state:3"]) == 2
    assert "--batch-axis state:3: input 'state' has 3 dims" in capsys.readouterr().err
    assert main([*argv, "--batch-axis", "state:1"]) == 0
    assert "6 sample(s)" in capsys.readouterr().out
    result = verify(path, path, data=tmp_path / "a.npz", input_values={"sr": 16000})
    assert result.samples == 6


def _failing_model() -> onnx.ModelProto:
    """Loads, but its Reshape cannot run: onnxruntime fails at run time."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 24], np.ones(8 * 24, dtype=np.float32))
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [5, 7])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], "mm"),
            helper.make_node("Reshape", ["h", "shape"], ["y"], "rs"),
        ],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weight, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def test_onnxruntime_failures_are_one_quiet_line(capfd):
    with pytest.raises(RuntimeFailure) as error:
        lrdeploy.compress(_failing_model(), rank_ratio=0.25)
    message = str(error.value)
    assert message.startswith("onnxruntime failed to run the original model: Reshape node 'rs': ")
    assert "cannot be reshaped" in message
    assert "onnxruntime_src" not in message and "[ONNXRuntimeError]" not in message and "\n" not in message
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # nothing from onnxruntime's own log


def test_load_failures_are_one_quiet_line(capfd):
    model = _failing_model()
    model.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(RuntimeFailure, match=r"could not load the original model: .*NoSuchOp") as error:
        lrdeploy.compress(model, rank_ratio=0.25)
    assert "[ONNXRuntimeError]" not in str(error.value)
    assert capfd.readouterr().err == ""


def test_summarize_keeps_plain_messages():
    assert summarize(ValueError("plain\nsecond line")) == "plain"
    assert summarize(ValueError("")) == "ValueError"
