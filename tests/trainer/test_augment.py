"""`lrdeploy finetune --augment`: shifts within ±2 pixels with zero fill, seeded, the teacher sees the
student's batch, resumable, refused for inputs that are not images, and nothing changes when it is off."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")
if importlib.util.find_spec("onnx2torch") is None:
    pytest.skip("needs onnx2torch (the [train] extra)", allow_module_level=True)

from reporters import Interrupt
from test_finetune import _initializers, teacher_and_student

from lrdeploy.errors import UsageError
from lrdeploy.trainer import augment
from lrdeploy.trainer import finetune as finetune_module
from lrdeploy.trainer.augment import MAX_SHIFT, draw_shifts, epoch_generator, shift
from lrdeploy.trainer.finetune import FinetuneConfig, finetune


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A teacher, its rank-0.1 compression, and 192 images labelled by the teacher."""
    return teacher_and_student(tmp_path_factory.mktemp("augment"), 192, 128)


def _config(**changes: object) -> FinetuneConfig:
    settings = {"epochs": 2, "batch_size": 32, "lr": 0.02, "device": "cpu", "augment": True}
    return FinetuneConfig(**(settings | changes))


def _run(tiny: dict[str, Path], config: FinetuneConfig, student: str = "compressed", **kwargs: object):
    return finetune(tiny[student], tiny["teacher"], str(tiny["data"]), config, **kwargs)


# -- the shifts ------------------------------------------------------------------------------------------


def test_shift_moves_each_image_and_fills_zeros_exactly() -> None:
    images = np.arange(1, 1 + 3 * 2 * 4 * 5, dtype=np.float32).reshape(3, 2, 4, 5)
    moved = shift(images, np.array([[0, 0], [1, -2], [-2, 2]]))
    np.testing.assert_array_equal(moved[0], images[0])
    expected = np.zeros((2, 4, 5), np.float32)
    expected[:, 1:, :3] = images[1, :, :3, 2:]  # down 1, left 2
    np.testing.assert_array_equal(moved[1], expected)
    expected = np.zeros((2, 4, 5), np.float32)
    expected[:, :2, 2:] = images[2, :, 2:, :3]  # up 2, right 2
    np.testing.assert_array_equal(moved[2], expected)
    assert moved.dtype == images.dtype and moved.flags.c_contiguous


@given(
    dy=st.integers(-MAX_SHIFT, MAX_SHIFT),
    dx=st.integers(-MAX_SHIFT, MAX_SHIFT),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
)
def test_shift_is_a_translation_with_zero_fill(dy: int, dx: int, shape: tuple[int, int, int]) -> None:
    image = np.random.default_rng(0).random((1, *shape), dtype=np.float32) + 1  # no zeros of its own
    moved = shift(image, np.array([[dy, dx]]))[0]
    _, h, w = shape
    for y in range(h):
        for x in range(w):
            inside = 0 <= y - dy < h and 0 <= x - dx < w
            want = image[0, :, y - dy, x - dx] if inside else np.zeros(shape[0], np.float32)
            np.testing.assert_array_equal(moved[:, y, x], want)


def test_shifts_stay_within_two_pixels_and_reach_every_offset() -> None:
    shifts = draw_shifts(epoch_generator(0, 1), 2000)
    assert shifts.shape == (2000, 2) and MAX_SHIFT == 2
    assert set(np.unique(shifts)) == {-2, -1, 0, 1, 2}


def test_seeded_generators_draw_identical_batches() -> None:
    images = np.random.default_rng(1).random((64, 1, 8, 8), dtype=np.float32)
    first = shift(images, draw_shifts(epoch_generator(7, 3), 64))
    np.testing.assert_array_equal(first, shift(images, draw_shifts(epoch_generator(7, 3), 64)))
    for other in (epoch_generator(8, 3), epoch_generator(7, 4), epoch_generator(7, 3, rank=1)):
        assert not np.array_equal(first, shift(images, draw_shifts(other, 64)))


def test_a_negative_seed_draws_as_the_trainer_accepts_it() -> None:
    """The trainer takes any integer seed; numpy's generator only non-negative ones."""
    first = draw_shifts(epoch_generator(-1, 1), 16)
    np.testing.assert_array_equal(first, draw_shifts(epoch_generator(-1, 1), 16))
    assert not np.array_equal(first, draw_shifts(epoch_generator(1, 1), 16))


# -- in the fine-tune ------------------------------------------------------------------------------------


def test_the_teacher_sees_the_batch_the_student_trains_on(tiny, monkeypatch) -> None:
    """Student = the teacher itself, pure distillation: the loss is 0 only if both see the same images."""
    seen: list[tuple] = []  # (the loader's batch, what the teacher ran on, what the student trains on)

    def spy(x, rng, teacher):
        def recording(moved):
            seen.append((x.numpy().copy(), moved.copy()))
            return teacher(moved)

        shifted, targets = augment.augmented_batch(x, rng, recording)
        seen[-1] += (shifted,)
        return shifted, targets

    monkeypatch.setattr(finetune_module, "augmented_batch", spy)
    result = _run(tiny, _config(alpha=0.0, verify=False), student="teacher")
    assert len(seen) == 2 * 4  # 2 epochs of 4 batches of 32
    for _, teacher_input, student_input in seen:
        np.testing.assert_array_equal(teacher_input, student_input.numpy())
    assert sum(not np.array_equal(original, moved) for original, moved, _ in seen) == len(seen)
    assert max(h["loss"] for h in result.history) < 1e-6


def test_an_input_that_is_not_an_image_batch_is_one_line(tmp_path: Path, capsys) -> None:
    weights = numpy_helper.from_array(np.ones((8, 10), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("ReduceMean", ["y"], ["logits"])],
        "sequence",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "seq.onnx")
    message = r"^--augment shifts images \[N, C, H, W\], but the model's input 'x' is \[N, 8, 8\]; fine"
    with pytest.raises(UsageError, match=message) as caught:
        finetune(tmp_path / "seq.onnx", tmp_path / "seq.onnx", "mnist", _config())
    assert "\n" not in str(caught.value)
    from lrdeploy.cli.app import main

    argv = ["finetune", str(tmp_path / "seq.onnx"), "--teacher", str(tmp_path / "seq.onnx"), "--augment"]
    assert main([*argv, "-o", str(tmp_path / "out.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert "is [N, 8, 8]" in " ".join(error.split()) and len(error.splitlines()) == 1, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq.onnx"]


def test_resume_with_augment_ends_with_the_weights_of_an_uninterrupted_run(tiny, tmp_path: Path) -> None:
    config, checkpoint = _config(verify=False), tmp_path / "run.ckpt.pt"
    whole = _run(tiny, config)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, config, checkpoint=checkpoint, reporter=Interrupt(1))
    with pytest.raises(UsageError, match="fine-tuned with augment True, this run False"):
        _run(tiny, _config(verify=False, augment=False), checkpoint=checkpoint, resume=True)
    resumed = _run(tiny, config, checkpoint=checkpoint, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for name, value in _initializers(whole.model).items():
        np.testing.assert_array_equal(_initializers(resumed.model)[name], value)
    plain = _run(tiny, _config(verify=False, augment=False))
    assert any(
        not np.array_equal(value, _initializers(plain.model)[name])
        for name, value in _initializers(whole.model).items()
    )


def test_off_trains_on_the_data_as_is_and_records_nothing_new(tiny, monkeypatch) -> None:
    """Off: no shift is drawn, the settings (metadata, checkpoints) are those of before the option, and the
    weights equal an augmented run whose every shift is 0 (the teacher per batch = the teacher up front)."""
    monkeypatch.setattr(augment, "draw_shifts", lambda rng, count: np.zeros((count, 2), np.int64))
    zero = _run(tiny, _config(verify=False))

    def refuse(*args):
        raise AssertionError("augmentation used while off")

    monkeypatch.setattr(finetune_module, "augmented_batch", refuse)
    off = _run(tiny, _config(augment=False, verify=False))
    for name, value in _initializers(off.model).items():
        np.testing.assert_array_equal(_initializers(zero.model)[name], value)
    assert "augment" not in FinetuneConfig().to_dict() and FinetuneConfig().augment is False
    metadata = {p.key: p.value for p in off.model.metadata_props}["lrdeploy.finetune.config"]
    assert '"augment"' not in metadata
    assert '"augment":true' in {p.key: p.value for p in zero.model.metadata_props}["lrdeploy.finetune.config"]


def test_augment_must_be_a_bool() -> None:
    with pytest.raises(UsageError, match="augment must be True or False, got 2"):
        FinetuneConfig(augment=2)  # type: ignore[arg-type]
