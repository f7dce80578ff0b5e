"""Verification: metrics, gates and their exit codes, in the API, `lrdeploy verify` and `compress`."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lrdeploy
from lrdeploy import verify
from lrdeploy.cli.app import main
from lrdeploy.errors import UsageError, VerificationFailed
from lrdeploy.runtime.verification import RANDOM_BATCHES, VerifyConfig
from lrdeploy.runtime.verify import Gates, OutputComparison, Verification, _Accumulator
from models import graph_model, run, weight


def _classifier(rng: np.random.Generator, classes: int = 10, hidden: int = 48) -> onnx.ModelProto:
    """x[N, 32] → Gemm → Relu → Gemm → logits[N, classes], with a low-rank-friendly first layer."""
    w1 = (weight(rng, hidden, 4) @ weight(rng, 4, 32) + 0.01 * weight(rng, hidden, 32)).astype(np.float32)
    return graph_model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1),
        ],
        {"x": ["batch", 32]},
        {"logits": ["batch", classes]},
        {"w1": w1, "b1": weight(rng, hidden), "w2": weight(rng, classes, hidden), "b2": weight(rng, classes)},
    )


def _damaged(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    damaged = onnx.ModelProto()
    damaged.CopyFrom(model)
    for tensor in damaged.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * factor, name))
    return damaged


def test_accumulator_metrics_match_numpy(rng):
    ref = rng.standard_normal((6, 7)).astype(np.float32)
    new = ref + 0.05 * rng.standard_normal((6, 7)).astype(np.float32)
    acc = _Accumulator(rtol=0.1)
    acc.add(ref[:4], new[:4], np.arange(4))
    acc.add(ref[4:], new[4:], np.arange(2))
    out = acc.finish("y")
    a, b = ref.astype(np.float64), new.astype(np.float64)
    assert out.max_abs_diff == pytest.approx(np.abs(a - b).max())
    assert out.rel_l2 == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a))
    assert out.cosine == pytest.approx(float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b)))
    assert out.allclose_excess == pytest.approx((np.abs(a - b) - 0.1 * np.abs(a)).max())
    assert out.top1_agreement == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    labels = np.r_[np.arange(4), np.arange(2)]
    assert out.accuracy_original == pytest.approx(np.mean(a.argmax(1) == labels))
    assert out.accuracy_compressed == pytest.approx(np.mean(b.argmax(1) == labels))


def test_top5_agreement_counts_reference_top1_in_new_top5():
    ref = np.array([[9.0, 1, 2, 3, 4, 5, 0], [0, 9, 1, 2, 3, 4, 5]])
    new = np.array([[0.0, 9, 8, 7, 6, 5, 4], [9, 5, 8, 7, 6, 0, 4]])  # class 0 out of row 0 top 5
    acc = _Accumulator(rtol=0.0)
    acc.add(ref, new, None)
    out = acc.finish("logits")
    assert out.top1_agreement == 0.0
    assert out.top5_agreement == 0.5


def test_non_class_outputs_have_no_top1():
    acc = _Accumulator(rtol=0.0)
    acc.add(np.ones((2, 3, 4)), np.ones((2, 3, 4)), None)
    out = acc.finish("features")
    assert out.top1_agreement is None and out.rel_l2 == 0.0 and out.cosine == 1.0


def test_nan_output_is_not_silently_passed():
    acc = _Accumulator(rtol=0.0)
    acc.add(np.ones((2, 3)), np.array([[1.0, np.nan, 1.0], [1, 1, 1]]), None)
    out = acc.finish("y")
    assert math.isnan(out.rel_l2) and out.max_abs_diff == math.inf
    result = Verification("CPUExecutionProvider", (out,), 2, "random")
    assert Gates(max_rel_l2=1.0).failures(result)
    assert Gates(min_cosine=0.0).failures(result)
    assert Gates(atol=1e9).failures(result)  # NaN where the original has a number fails every gate


def test_the_same_nonfinite_values_in_both_models_are_agreement():
    """A masked score (-inf) or a NaN the original also produces is not an error of the compression."""
    ref = np.array([[1.0, -np.inf, 2.0], [np.nan, 1.0, 1.0]])
    acc = _Accumulator(rtol=0.0)
    acc.add(ref, ref + np.array([[1e-3, 0, 0], [0, 0, 0]]), None)
    out = acc.finish("y")
    assert out.nonfinite and out.max_abs_diff == pytest.approx(1e-3)
    assert out.rel_l2 == pytest.approx(1e-3 / math.sqrt(1 + 4 + 1 + 1))
    assert not Gates(atol=1e-2).failures(Verification("CPUExecutionProvider", (out,), 2, "random"))


def test_class_id_outputs_count_as_top1_not_as_magnitudes():
    """An ArgMax output: a flipped id is a top-1 disagreement, not a numeric error of |9 − 0|."""
    acc = _Accumulator(rtol=0.0)
    acc.add(np.array([0, 3, 5, 7]), np.array([9, 3, 5, 7]), np.array([0, 3, 4, 7]))
    ids = acc.finish("label")
    assert ids.rel_l2 is None and ids.cosine is None
    assert ids.exact_match == 0.75 and ids.top1_agreement == 0.75
    assert (ids.accuracy_original, ids.accuracy_compressed) == (0.75, 0.5)
    scores = _Accumulator(rtol=0.0)
    scores.add(np.eye(4, 10), np.eye(4, 10) * 1.1, None)
    result = Verification("CPUExecutionProvider", (scores.finish("y"), ids), 4, "random")
    assert result.max_abs_diff == pytest.approx(0.1)  # from the scores only
    assert result.rel_l2 == pytest.approx(0.1)
    assert Gates(min_top1=0.8).failures(result) == ["output 'label' top-1 agreement 0.7500 < min_top1=0.8"]
    assert Gates(max_rel_l2=0.2, min_cosine=0.9).failures(result) == []
    assert Gates(atol=0.5).failures(result)  # allclose semantics still hold for ids


def test_mask_and_string_outputs_compare_by_equality():
    mask = _Accumulator(rtol=0.0)
    mask.add(np.array([[True, False], [True, True]]), np.array([[True, True], [True, True]]), None)
    assert mask.finish("mask").exact_match == 0.75
    names = _Accumulator(rtol=0.0)
    names.add(np.array(["cat", "dog"], dtype=object), np.array(["cat", "cow"], dtype=object), None)
    out = names.finish("names")
    assert (out.exact_match, out.top1_agreement, out.max_abs_diff) == (0.5, 0.5, 1.0)


def test_report_json_is_strict_json_with_nan_outputs():
    acc = _Accumulator(rtol=0.0)
    acc.add(np.ones((2, 3)), np.full((2, 3), np.nan), None)
    result = Verification("CPUExecutionProvider", (acc.finish("y"),), 2, "random")
    text = json.dumps(result.to_dict(), allow_nan=False)
    loaded = json.loads(text)
    assert loaded["rel_l2"] is None and loaded["nonfinite"] is True
    assert loaded["outputs"][0]["nonfinite"] is True


def _verification(**fields) -> Verification:
    base = dict(
        name="logits",
        shape=(4, 10),
        max_abs_diff=0.5,
        allclose_excess=0.2,
        rel_l2=0.1,
        cosine=0.98,
        top1_agreement=0.75,
        top5_agreement=1.0,
        accuracy_original=None,
        accuracy_compressed=None,
    )
    return Verification("CPUExecutionProvider", (OutputComparison(**(base | fields)),), 4, "random")


@pytest.mark.parametrize(
    ("gates", "failing"),
    [
        (Gates(atol=0.3), False),
        (Gates(atol=0.1), True),
        (Gates(max_rel_l2=0.1), False),
        (Gates(max_rel_l2=0.05), True),
        (Gates(min_cosine=0.97), False),
        (Gates(min_cosine=0.99), True),
        (Gates(min_top1=0.75), False),
        (Gates(min_top1=0.8), True),
    ],
)
def test_gates(gates, failing):
    result = _verification()
    assert bool(gates.failures(result)) == failing
    if failing:
        with pytest.raises(VerificationFailed, match="output 'logits'"):
            gates.check(result)


@pytest.mark.parametrize(
    "gate",
    [{"atol": -1}, {"atol": math.nan}, {"max_rel_l2": math.nan}, {"min_cosine": 1.5}, {"min_top1": -0.5}],
)
def test_gate_values_are_validated(gate):
    with pytest.raises(UsageError, match=f"{next(iter(gate))} must be"):
        Gates(**gate)


def test_rtol_alone_is_a_gate():
    assert Gates(rtol=0.1).active and Gates(rtol=0.1).atol == 0.0
    assert Gates(atol=0.3, rtol=0.1).atol == 0.3


def test_gates_with_no_verify_are_refused(rng):
    with pytest.raises(UsageError, match="gates need verification"):
        lrdeploy.compress(_classifier(rng), rank_ratio=0.5, verify=False, gates=Gates(min_cosine=0.99))


def test_no_samples_is_a_usage_error(tmp_path, rng, capsys):
    a = tmp_path / "a.onnx"
    onnx.save(_classifier(rng), a)
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 32), np.float32))
    assert main(["verify", str(a), str(a), "--data", str(tmp_path / "empty.npz")]) == 2
    assert "no samples" in capsys.readouterr().err


def test_verify_api_full_rank_passes_and_damaged_fails(tmp_path, rng):
    original = tmp_path / "m.onnx"
    onnx.save(_classifier(rng), original)
    full = tmp_path / "full.onnx"
    lrdeploy.compress(original, rank_ratio=1.0, output=full, verify=False)
    result = verify(original, full, random_batches=4, input_shapes={"x": (8, 32)})
    assert result.samples == 32 and result.rel_l2 <= 1e-5
    damaged = tmp_path / "damaged.onnx"
    onnx.save(_damaged(onnx.load(original), "w2", 1.5), damaged)
    bad = verify(original, damaged, config=VerifyConfig(random_batches=2), input_shapes={"x": (8, 32)})
    assert bad.rel_l2 == pytest.approx(0.5, rel=0.2)
    assert Gates(max_rel_l2=1e-3).failures(bad)


def test_verify_cli_exit_codes(tmp_path, rng, capsys):
    original = tmp_path / "m.onnx"
    onnx.save(_classifier(rng), original)
    full = tmp_path / "full.onnx"
    damaged = tmp_path / "damaged.onnx"
    assert main(["compress", str(original), "--rank-ratio", "1.0", "-o", str(full), "--no-verify"]) == 0
    onnx.save(_damaged(onnx.load(original), "w1", 3.0), damaged)
    capsys.readouterr()
    out_json = tmp_path / "v.json"
    code = main(
        [
            "verify",
            str(original),
            str(full),
            "--max-rel-l2",
            "1e-5",
            "--random-batches",
            "3",
            "--json",
            str(out_json),
        ]
    )
    assert code == 0
    saved = json.loads(out_json.read_text())
    assert saved["rel_l2"] <= 1e-5 and saved["gate_failures"] == []
    capsys.readouterr()
    code = main(["verify", str(original), str(damaged), "--max-rel-l2", "1e-3", "--min-cosine", "0.999"])
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("error: verification failed: output 'logits'")
    assert len(err.strip().splitlines()) == 1


def test_verify_cli_rejects_unrelated_models(tmp_path, rng, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_classifier(rng), a)
    onnx.save(_classifier(rng, classes=7), b)
    code = main(["verify", str(a), str(b)])
    assert code == 1
    assert "error:" in capsys.readouterr().err
    renamed = _classifier(rng)
    renamed.graph.input[0].name = "pixels"
    renamed.graph.node[0].input[0] = "pixels"
    onnx.save(renamed, b)
    assert main(["verify", str(a), str(b)]) == 2
    assert "different inputs (original ['x'], compressed ['pixels'])" in capsys.readouterr().err


def test_compress_gate_failure_writes_nothing_and_exits_3(tmp_path, rng, capsys):
    original = tmp_path / "m.onnx"
    onnx.save(_classifier(rng), original)
    before = original.read_bytes()
    output = tmp_path / "small.onnx"
    report = tmp_path / "report.json"
    args = [
        "compress",
        str(original),
        "--rank",
        "1",
        "-o",
        str(output),
        "--random-batches",
        "4",
        "--max-rel-l2",
        "1e-6",
    ]
    code = main([*args, "--report", str(report)])
    assert code == 3
    assert not output.exists()
    assert original.read_bytes() == before
    assert "not written" in capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["output"] is None and data["gate_failures"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert main([*args, "--keep-failed"]) == 3
    assert output.exists()


def test_compress_gate_failure_in_api_carries_report(tmp_path, rng):
    with pytest.raises(VerificationFailed) as caught:
        lrdeploy.compress(_classifier(rng), rank=1, gates=Gates(min_cosine=0.999999), random_batches=4)
    report = caught.value.report
    assert report.verification is not None and report.gate_failures


def test_compress_with_labelled_data_reports_accuracy(tmp_path, rng):
    model = _classifier(rng)
    x = rng.standard_normal((50, 32)).astype(np.float32)
    data = tmp_path / "data.npz"
    labels = run(model, {"x": x})[0].argmax(1)
    np.savez(data, x=x, labels=labels)
    _, report = lrdeploy.compress(model, rank_ratio=0.25, data=str(data), batch_size=16)
    result = report.verification
    assert result.samples == 50
    assert result.scored.accuracy_original == 1.0
    assert 0.0 <= result.scored.accuracy_compressed <= 1.0
    assert result.data.startswith("data.npz")


def test_api_takes_arrays_as_data(rng):
    model = _classifier(rng)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 40)
    _, report = lrdeploy.compress(model, rank_ratio=0.5, data={"x": x, "labels": labels}, device="cpu")
    assert (
        report.verification.samples == 40 and report.verification.to_dict()["accuracy_original"] is not None
    )
    result = lrdeploy.verify(model, model, data=x, device="cpu")
    assert result.samples == 40 and result.max_abs_diff == 0
    with pytest.raises(UsageError, match="data must be 'random', 'mnist', a path, a numpy array"):
        lrdeploy.verify(model, model, data=[1, 2, 3])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank_ratio": "0.3"}, "rank ratio must be a number, got '0.3'"),
        ({"rank_ratio": 0.3, "input_shapes": {"x": (-1, 32)}}, "input shape for 'x' must be positive"),
        ({"rank_ratio": 0.3, "seed": "a"}, "seed must be an integer"),
        ({"rank_ratio": 0.3, "gates": 0.5}, "gates must be lrdeploy.Gates"),
        ({"rank_ratio": 0.3, "exclude": "nothing*"}, "--exclude 'nothing\\*' matches no factorizable layer"),
    ],
)
def test_api_arguments_are_checked_with_usage_errors(rng, options, message):
    with pytest.raises(UsageError, match=message):
        lrdeploy.compress(_classifier(rng), verify=False, **options)


def test_api_accepts_numpy_scalars_and_gate_dicts(rng):
    model = _classifier(rng)
    _, report = lrdeploy.compress(
        model, rank_ratio=np.float32(0.5), overrides={"fc1": np.int64(3)}, verify=False
    )
    assert {layer.decision.name: layer.decision.rank for layer in report.layers}["fc1"] == 3
    with pytest.raises(VerificationFailed):
        lrdeploy.compress(model, rank=1, gates={"max_rel_l2": 1e-6}, device="cpu")


# --- honest defaults: how many samples, and a warning when outputs are far off ----------------------


def test_default_verification_draws_several_random_samples_and_says_so(rng):
    model = _classifier(rng)
    assert VerifyConfig().random_batches == RANDOM_BATCHES == 8
    result = verify(model, model)
    assert result.samples == 8 and result.data == "random (8 batches, seed 0)"
    assert result.few_samples and result.to_dict()["few_samples"] is True  # top-1 of 8 is no rate
    assert result.warning is None
    many = verify(model, model, data=rng.standard_normal((120, 32)).astype(np.float32))
    assert many.samples == 120 and not many.few_samples


def test_outputs_far_from_the_original_are_flagged_without_a_gate(rng):
    model = _classifier(rng)
    result = verify(model, _damaged(model, "w2", -1.0))
    assert not VerifyConfig().gates.active and not Gates().failures(result)
    assert result.warning.startswith("output 'logits' is far from the original's (cosine -1.000, rel L2 2.0")
    assert result.to_dict()["warning"] == result.warning
    slightly = verify(model, _damaged(model, "w2", 1.01))
    assert slightly.warning is None
    acc = _Accumulator(rtol=0.0)
    acc.add(np.ones((2, 3)), np.array([[1.0, np.nan, 1.0], [1.0, 1.0, 1.0]]), None)
    nan = Verification("CPUExecutionProvider", (acc.finish("y"),), 2, "random")
    assert nan.warning.startswith("output 'y' has NaN/inf where the original has numbers")


def test_data_label_and_shape_say_what_was_used_under_limit(tmp_path, rng):
    model = _classifier(rng)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 32)).astype(np.float32))
    result = verify(model, model, data=tmp_path / "d.npz", limit=30, batch_size=8)
    assert result.samples == 30 and result.data == "d.npz (30 of 40 samples)"
    assert result.outputs[0].shape == ("6-8", 10)  # batches of 8, 8, 8 and 6
    assert result.to_dict()["outputs"][0]["shape"] == ["6-8", 10]
    assert verify(model, model, input_shapes={"x": (4, 32)}).outputs[0].shape == (4, 10)


def test_result_attributes_match_the_json_keys(tmp_path, rng):
    model = _classifier(rng)
    x = rng.standard_normal((20, 32)).astype(np.float32)
    result = verify(model, model, data={"x": x, "labels": run(model, {"x": x})[0].argmax(1)})
    saved = json.loads(json.dumps(result.to_dict()))
    assert saved["accuracy_original"] == 1.0
    for key, value in saved.items():
        attribute = getattr(result, key)
        if key == "outputs":
            assert len(attribute) == len(value)
            for out, out_json in zip(attribute, value, strict=True):
                assert {k: getattr(out, k) for k in out_json} == out_json | {"shape": out.shape}
        else:
            assert attribute == value, key


def test_messages_name_parameters_in_python_and_flags_on_the_command_line(tmp_path, rng, capsys):
    from lrdeploy.spelling import command_line, option

    assert (option("device", "cuda"), option("verify", False)) == ("device='cuda'", "verify=False")
    as_flags = command_line(
        lambda: (option("device", "cuda"), option("verify", False), option("input_shapes"))
    )
    assert as_flags() == ("--device cuda", "--no-verify", "--input-shape")
    assert option("device", "cuda") == "device='cuda'"  # the CLI's spelling ends with the call
    with pytest.raises(UsageError, match=r"^batch_size must be a positive integer, got 0$"):
        VerifyConfig(batch_size=0)
    with pytest.raises(UsageError, match=r"^min_cosine must be in \[-1, 1\], got 2$"):
        Gates(min_cosine=2)
    path = tmp_path / "m.onnx"
    onnx.save(_classifier(rng), path)
    assert main(["verify", str(path), str(path), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --batch-size must be a positive integer, got 0")
    assert main(["verify", str(path), str(path), "--data", str(tmp_path / "none.npz")]) == 2
    assert f"--data {tmp_path / 'none.npz'}: no such file" in capsys.readouterr().err


def test_integer_image_input_is_refused_from_scaled_pixels_and_verified_from_raw(tmp_path, capsys):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for index in range(3):
        image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["xf"], to=onnx.TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["xf"], ["y"], axes=[2, 3], keepdims=0),
        ],
        "uint8_input",
        [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    assert main(["verify", str(path), str(path), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "input 'x' is uint8 but the pixels scaled by 0.003922 give fractions" in err
    assert "pass --scale 1 (and no --mean/--std)" in err and len(err.strip().splitlines()) == 1
    assert main(["verify", str(path), str(path), "--data", str(tmp_path), "--scale", "1"]) == 0
    assert "3 sample(s)" in capsys.readouterr().out


ORT_FAILS_AT_RUN = """
import sys
import onnx
from onnx import TensorProto, helper
graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
     helper.make_tensor_value_info("s", TensorProto.INT64, [1])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), sys.argv[1])
from lrdeploy.cli.app import main
sys.exit(main(["verify", sys.argv[1], sys.argv[1]]))
"""


def test_onnxruntime_logs_nothing_before_our_one_line_error(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", ORT_FAILS_AT_RUN, str(tmp_path / "m.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: onnxruntime failed to run the original model")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # no [E:onnxruntime:...] log above it
