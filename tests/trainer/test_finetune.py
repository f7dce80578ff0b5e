"""`lrdeploy finetune`: same graph with new values, checked and loadable; distillation helps; errors, atomic
outputs and resume."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:  # imported through lrdeploy: it may lack torchvision
    pytest.skip("needs onnx2torch (the [train] extra)", allow_module_level=True)

import onnxruntime as ort
import torch
from reporters import Interrupt

import lrdeploy
from lrdeploy.errors import UsageError, VerificationFailed
from lrdeploy.runtime.verification import VerifyConfig
from lrdeploy.runtime.verify import Gates
from lrdeploy.trainer.finetune import FinetuneConfig, finetune
from lrdeploy.trainer.student import build_student

MODELS = Path(__file__).resolve().parents[2] / "models"


def _teacher(rng: np.random.Generator, extra: list[onnx.NodeProto] = ()) -> onnx.ModelProto:
    """Conv → Relu → Flatten → MatMul + Add → Relu → Gemm (alpha, transB = 0): every kind the student maps."""
    weights = {
        "conv.w": rng.standard_normal((8, 1, 3, 3)) * 0.5,
        "conv.b": rng.standard_normal(8) * 0.1,
        "fc1.w": rng.standard_normal((8 * 8 * 8, 32)) / 16,
        "fc1.b": rng.standard_normal(32) * 0.1,
        "fc2.w": rng.standard_normal((32, 10)) / 4,
        "fc2.b": rng.standard_normal(10) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc1.w"], ["m"], name="fc1"),
        helper.make_node("Add", ["m", "fc1.b"], ["a"], name="fc1.bias"),
        helper.make_node("Relu", ["a"], ["h"], name="relu2"),
        helper.make_node(
            "Gemm", ["h", "fc2.w", "fc2.b"], ["logits" if not extra else "z"], name="fc2", alpha=1.5
        ),
        *extra,
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    helper.set_model_props(model, {"author": "tests"})
    onnx.checker.check_model(model, full_check=True)
    return model


def teacher_and_student(root: Path, samples: int, train: int) -> dict[str, Path]:
    """Under ``root``: a teacher, its compression at rank ratio 0.1 (damaged on purpose), and ``samples``
    images labelled by the teacher, the first ``train`` of them the training split."""
    rng = np.random.default_rng(0)
    teacher = _teacher(rng)
    onnx.save(teacher, root / "teacher.onnx")
    lrdeploy.compress(root / "teacher.onnx", rank_ratio=0.1, verify=False, output=root / "compressed.onnx")
    x = rng.random((samples, 1, 8, 8), dtype=np.float32)
    labels = ort.InferenceSession(teacher.SerializeToString()).run(None, {"x": x})[0].argmax(1)
    split = {"x_train": x[:train], "y_train": labels[:train], "x_test": x[train:], "y_test": labels[train:]}
    np.savez(root / "data.npz", **split)
    names = ("teacher", "compressed")
    return {"root": root, "data": root / "data.npz", **{name: root / f"{name}.onnx" for name in names}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return teacher_and_student(tmp_path_factory.mktemp("finetune"), 640, 512)


def _config(**changes: object) -> FinetuneConfig:
    return FinetuneConfig(**{"epochs": 1, "batch_size": 32, "lr": 0.02, "device": "cpu", **changes})


def _data(setup: dict[str, Path]) -> str:
    return str(setup["data"])


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_the_output_is_the_compressed_graph_with_new_values(setup, tmp_path: Path) -> None:
    output = tmp_path / "tuned.onnx"
    result = finetune(setup["compressed"], setup["teacher"], _data(setup), _config(), output=output)
    before, after = onnx.load(setup["compressed"]), onnx.load(output)
    assert [
        (n.op_type, n.name, list(n.input), list(n.output), list(n.attribute)) for n in after.graph.node
    ] == [(n.op_type, n.name, list(n.input), list(n.output), list(n.attribute)) for n in before.graph.node]
    old, new = _initializers(before), _initializers(after)
    assert [(k, v.shape, v.dtype) for k, v in new.items()] == [(k, v.shape, v.dtype) for k, v in old.items()]
    assert (after.opset_import, after.ir_version, after.graph.input, after.graph.output) == (
        before.opset_import,
        before.ir_version,
        before.graph.input,
        before.graph.output,
    )
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    assert changed == set(result.trained)
    assert {"conv.b", "fc1.b", "fc2.b"} <= changed  # Conv, MatMul + Add and Gemm biases all train
    assert any(k.endswith("_lowrank_in") for k in changed) and any(
        k.endswith("_lowrank_out") for k in changed
    )
    assert result.frozen == {}
    metadata = {p.key: p.value for p in after.metadata_props}
    assert metadata["author"] == "tests"  # the user's metadata and compress's provenance are kept
    assert metadata["lrdeploy.config"] == {p.key: p.value for p in before.metadata_props}["lrdeploy.config"]
    assert '"temperature":3.0' in metadata["lrdeploy.finetune.config"]
    assert len(metadata["lrdeploy.finetune.teacher_sha256"]) == 64
    onnx.checker.check_model(str(output), full_check=True)
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((2, 1, 8, 8), np.float32)})[0].shape == (2, 10)


def test_one_epoch_lowers_the_distillation_loss_and_raises_accuracy(setup) -> None:
    result = finetune(setup["compressed"], setup["teacher"], _data(setup), _config(epochs=2))
    assert result.accuracy_before < 0.8  # the rank-0.1 compression is damaged
    assert result.distill_after < 0.5 * result.distill_before
    assert result.accuracy_after > result.accuracy_before + 0.1
    assert result.teacher_accuracy == 1.0  # labels are the teacher's
    assert result.verification is not None and result.verification.samples == 128  # the held-out split


def test_the_student_computes_what_onnxruntime_does_on_the_bundled_models() -> None:
    """onnx2torch's conversion and our map back by name, on every bundled baseline, compressed."""
    x = np.random.default_rng(1).random((4, 1, 28, 28), dtype=np.float32)
    for arch in ("mlp", "lenet5", "vgg"):
        compressed, _ = lrdeploy.compress(MODELS / f"{arch}_baseline.onnx", rank_ratio=0.25, verify=False)
        student = build_student(compressed)
        weights = {t.name for t in compressed.graph.initializer if "weight" in t.name or "bias" in t.name}
        assert student.frozen == {} and set(student.targets.values()) == weights, arch
        reference = ort.InferenceSession(compressed.SerializeToString()).run(None, {"input": x})[0]
        with torch.no_grad():
            mine = student(torch.from_numpy(x))[0].numpy()
        np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-4)
        assert _initializers(student.write_back(compressed)).keys() == _initializers(compressed).keys()
        for name, value in _initializers(student.write_back(compressed)).items():
            np.testing.assert_array_equal(value, _initializers(compressed)[name])


def test_an_op_onnx2torch_cannot_convert_is_one_line_naming_it(tmp_path: Path) -> None:
    model = _teacher(np.random.default_rng(2), [helper.make_node("Hardmax", ["z"], ["logits"], name="hm")])
    with pytest.raises(UsageError, match=r"no converter for Hardmax \(opset 17\)") as caught:
        build_student(model)
    assert "\n" not in str(caught.value)
    onnx.save(model, tmp_path / "m.onnx")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lrdeploy",
            "finetune",
            str(tmp_path / "m.onnx"),
            "--teacher",
            str(tmp_path / "m.onnx"),
            "-o",
            str(tmp_path / "out.onnx"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "Hardmax" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_failed_gate_writes_nothing(setup, tmp_path: Path) -> None:
    gates = VerifyConfig(device="cpu", gates=Gates(max_rel_l2=1e-9))
    with pytest.raises(VerificationFailed, match="output not written"):
        finetune(
            setup["compressed"],
            setup["teacher"],
            _data(setup),
            _config(verification=gates),
            output=tmp_path / "out.onnx",
        )
    assert list(tmp_path.iterdir()) == []


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(setup, tmp_path: Path) -> None:
    config, checkpoint = _config(epochs=2, subset=256), tmp_path / "run.ckpt.pt"
    whole = finetune(setup["compressed"], setup["teacher"], _data(setup), config)
    with pytest.raises(KeyboardInterrupt):
        finetune(
            setup["compressed"],
            setup["teacher"],
            _data(setup),
            config,
            output=tmp_path / "out.onnx",
            checkpoint=checkpoint,
            reporter=Interrupt(1),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt.pt"]  # no output, no staging left
    with pytest.raises(UsageError, match=r"fine-tuned with lr 0\.02, this run 0\.5"):
        _resume(setup, _config(epochs=2, subset=256, lr=0.5), checkpoint)
    resumed = _resume(setup, config, checkpoint)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for name, value in _initializers(whole.model).items():
        np.testing.assert_array_equal(_initializers(resumed.model)[name], value)


def _resume(setup, config: FinetuneConfig, checkpoint: Path):
    return finetune(
        setup["compressed"], setup["teacher"], _data(setup), config, checkpoint=checkpoint, resume=True
    )


def _interrupted_after_one_epoch(setup, config, checkpoint: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        finetune(
            setup["compressed"],
            setup["teacher"],
            _data(setup),
            config,
            checkpoint=checkpoint,
            reporter=Interrupt(1),
        )


def test_resume_with_adam_and_warmup_ends_with_the_weights_of_an_uninterrupted_run(setup, tmp_path) -> None:
    config = _config(epochs=2, subset=256, optimizer="adam", lr=0.003, warmup=0.5)
    checkpoint = tmp_path / "run.ckpt.pt"
    whole = finetune(setup["compressed"], setup["teacher"], _data(setup), config)
    _interrupted_after_one_epoch(setup, config, checkpoint)
    with pytest.raises(UsageError, match="fine-tuned with optimizer 'adam', this run 'sgd'"):
        _resume(setup, _config(epochs=2, subset=256, lr=0.003, warmup=0.5), checkpoint)
    resumed = _resume(setup, config, checkpoint)
    for name, value in _initializers(whole.model).items():
        np.testing.assert_array_equal(_initializers(resumed.model)[name], value)
    before = _initializers(onnx.load(setup["compressed"]))
    assert any(not np.array_equal(before[n], v) for n, v in _initializers(whole.model).items())


def test_a_checkpoint_saved_before_optimizer_and_warmup_existed_resumes_as_sgd(setup, tmp_path) -> None:
    checkpoint = tmp_path / "run.ckpt.pt"
    config = _config(epochs=2, subset=64)
    _interrupted_after_one_epoch(setup, config, checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    del state["config"]["optimizer"], state["config"]["warmup"]
    torch.save(state, checkpoint)
    with pytest.raises(UsageError, match=r"fine-tuned with warmup 0\.0, this run 1\.0"):
        _resume(setup, _config(epochs=2, subset=64, warmup=1.0), checkpoint)
    resumed = _resume(setup, config, checkpoint)
    assert [h["epoch"] for h in resumed.history] == [1, 2]


def test_resume_refuses_another_student(setup, tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt.pt"
    finetune(setup["compressed"], setup["teacher"], _data(setup), _config(subset=64), checkpoint=checkpoint)
    with pytest.raises(UsageError, match="fine-tuned another student model"):
        finetune(
            setup["teacher"],
            setup["teacher"],
            _data(setup),
            _config(subset=64),
            checkpoint=checkpoint,
            resume=True,
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"alpha": 1.5}, "--alpha must be in"),
        ({"temperature": 0}, "--temperature must be > 0"),
        ({"loss": "l1"}, "--loss must be one of"),
        ({"epochs": 0}, "--epochs must be a positive integer"),
        ({"optimizer": "lbfgs"}, "--optimizer must be one of sgd, adam"),
        ({"warmup": -1.0}, r"--warmup must be in \[0, --epochs\]"),
        ({"epochs": 2, "warmup": 2.5}, r"--warmup must be in \[0, --epochs\]"),
    ],
)
def test_config_is_validated(changes: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _config(**changes)


def test_images_of_another_shape_are_refused(setup) -> None:
    with pytest.raises(
        UsageError, match=r"input 'x' is \['N', 1, 8, 8\] but --data gives images \[N, 1, 28, 28\]"
    ):
        finetune(setup["compressed"], setup["teacher"], "mnist", _config(subset=8))


def test_the_cli_module_imports_without_torch() -> None:
    code = "import sys, lrdeploy.cli.app\nassert not {'torch', 'onnx2torch'} & set(sys.modules), 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-o", "{compressed}"], "is a file the input model reads"),
        (["-o", "{root}/o.onnx", "--checkpoint", "{root}/o.onnx"], "is the same path as -o/--output"),
        (["-o", "{root}/o.onnx", "--resume"], "--resume: no checkpoint at"),
        (["-o", "{root}/o.onnx", "--alpha", "2"], "--alpha must be in [0, 1]"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(setup, capsys, flags: list[str], message: str) -> None:
    from lrdeploy.cli.app import main

    root = setup["root"]
    argv = [f.format(root=root, compressed=setup["compressed"]) for f in flags]
    code = main(["finetune", str(setup["compressed"]), "--teacher", str(setup["teacher"]), *argv])
    error = capsys.readouterr().err
    assert code == 2 and message in " ".join(error.split()), error
    assert not (root / "o.onnx").exists()


def test_under_torchrun_the_teacher_takes_as_many_threads_as_torch(setup, monkeypatch) -> None:
    """Every process runs its own teacher: onnxruntime's default (every core) would oversubscribe."""
    from lrdeploy.trainer import finetune as module
    from lrdeploy.trainer.distributed import Context

    calls: list[int | None] = []

    class Stop(Exception):
        pass

    def session(*args, **kwargs):
        calls.append(args[5] if len(args) > 5 else kwargs.get("threads"))
        raise Stop

    monkeypatch.setattr(module, "setup", lambda device: Context(torch.device("cpu"), 0, 0, world_size=2))
    monkeypatch.setattr(module, "teardown", lambda context: None)
    monkeypatch.setattr(module, "_session", session)
    with pytest.raises(Stop):
        finetune(setup["compressed"], setup["teacher"], _data(setup), _config())
    assert calls == [torch.get_num_threads()]
