"""Verification memory (issue 12): one onnxruntime session at a time, the original's outputs set aside in
memory or in temporary files, both models side by side only when those files cannot be written."""

from __future__ import annotations

import errno
import tempfile
import weakref

import numpy as np
import onnx
import pytest
from onnx import helper

import lrdeploy
import lrdeploy.io.modelio
import lrdeploy.runtime.spool as spool_module
import lrdeploy.runtime.verify as verify_module
from lrdeploy.runtime.sessions import Device, make_session
from lrdeploy.runtime.spool import Spool
from lrdeploy.runtime.verification import candidate_source
from models import graph_model, weight


def _mlp(rng: np.random.Generator, scale: float = 1.0) -> onnx.ModelProto:
    """x[N, 16] → MatMul → Relu → MatMul → (y[N, 10], its ArgMax ids[N]): a float and an integer output."""
    model = graph_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
            helper.make_node("ArgMax", ["y"], ["ids"], name="argmax", axis=1, keepdims=0),
        ],
        {"x": ["N", 16]},
        {"y": ["N", 10]},
        {"w1": weight(rng, 16, 24), "w2": scale * weight(rng, 24, 10)},
    )
    model.graph.output.append(helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N"]))
    return model


def _batches(rng: np.random.Generator, count: int = 5):
    return [({"x": rng.standard_normal((4, 16)).astype(np.float32)}, np.arange(4) % 10) for _ in range(count)]


@pytest.fixture
def live(monkeypatch):
    """Counts the sessions verification holds at once: {"now": n, "most": n, "made": n}."""
    counts = {"now": 0, "most": 0, "made": 0}
    make = verify_module.make_session

    def closed() -> None:
        counts["now"] -= 1

    def counted(*args, **kwargs):
        session = make(*args, **kwargs)
        counts["now"] += 1
        counts["made"] += 1
        counts["most"] = max(counts["most"], counts["now"])
        weakref.finalize(session, closed)
        return session

    monkeypatch.setattr(verify_module, "make_session", counted)
    return counts


def _compare(rng, keep_bytes: int = spool_module.KEEP_BYTES):
    original = _mlp(np.random.default_rng(7)).SerializeToString()
    compressed = _mlp(np.random.default_rng(7), scale=1.1).SerializeToString()
    return verify_module.compare_models(
        original, compressed, _batches(rng), Device("cpu"), rtol=0.01, keep_bytes=keep_bytes
    )


def test_the_two_sessions_are_never_alive_together(live, rng):
    result = _compare(rng)
    assert live == {"now": 0, "most": 1, "made": 2}
    assert result.samples == 20 and result.note is None
    y = next(o for o in result.outputs if o.name == "y")
    assert y.rel_l2 == pytest.approx(0.1, rel=1e-4) and y.cosine == pytest.approx(1.0)


def test_compress_and_verify_hold_one_model_at_a_time(live, tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(rng), path)
    _, report = lrdeploy.compress(path, rank_ratio=1.0, output=tmp_path / "out.onnx")
    assert live["most"] == 1 and live["made"] == 2
    assert report.verification.rel_l2 <= 1e-5
    again = lrdeploy.verify(path, tmp_path / "out.onnx", input_shapes={"x": (2, 16)})
    assert live["most"] == 1 and live["made"] == 4
    assert again.rel_l2 <= 1e-5 and again.samples == 16


def test_spilled_outputs_give_the_same_comparison_and_leave_no_files(monkeypatch, tmp_path, rng):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    kept = _compare(np.random.default_rng(3))
    spilled = _compare(np.random.default_rng(3), keep_bytes=0)
    assert spilled == kept
    assert list(tmp_path.iterdir()) == []


def test_when_nothing_can_be_spilled_both_models_run_side_by_side_and_say_so(monkeypatch, live, rng):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.np, "save", full)
    kept = _compare(np.random.default_rng(3))
    live["most"] = 0
    fallback = _compare(np.random.default_rng(3), keep_bytes=100)  # the first batch fits, the second not
    assert live["most"] == 2 and live["now"] == 0
    assert fallback.note is not None and "both models were loaded at once" in fallback.note
    assert "No space left" in fallback.note
    assert fallback.outputs == kept.outputs and fallback.samples == kept.samples


def test_progress_counts_each_model_run(rng, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(rng), path)
    seen: list[tuple[int, int]] = []
    lrdeploy.verify(
        path, path, input_shapes={"x": (2, 16)}, random_batches=3, progress=lambda d, t: seen.append((d, t))
    )
    assert seen == [(2, 12), (4, 12), (6, 12), (8, 12), (10, 12), (12, 12)]


def test_spool_keeps_order_spills_past_its_limit_and_cleans_up(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    small, large = np.arange(4, dtype=np.float32), np.ones((64, 64))
    strings = np.array(["a", "b"], dtype=object)
    with Spool(limit=100) as spool:
        spool.append([small, None, ["x"]])
        spool.append([large, strings])
        spool.append([large + 1])
        assert spool.held == small.nbytes + strings.nbytes and spool.spilled == 2 * large.nbytes
        assert len(list(tmp_path.iterdir())) == 1
        entries = list(spool.drain())
        assert len(spool) == 0 and spool.held == 0
    np.testing.assert_array_equal(entries[0][0], small)
    assert entries[0][1:] == [None, ["x"]]
    np.testing.assert_array_equal(entries[1][0], large)
    assert entries[1][1] is strings
    np.testing.assert_array_equal(entries[2][0], large + 1)
    assert list(tmp_path.iterdir()) == []


def test_a_large_compressed_model_without_an_output_is_given_as_a_file(monkeypatch, rng):
    import lrdeploy.runtime.verification as verification

    model = _mlp(rng)
    before = model.SerializeToString()
    with candidate_source(model, None) as source:
        assert isinstance(source, bytes) and source == before
    monkeypatch.setattr(verification, "INLINE_SOURCE_BYTES", 0)
    with candidate_source(model, None) as source:
        assert onnx.load(source) == model
    assert not source.exists()
    assert model.SerializeToString() == before


@pytest.mark.parametrize("inline", [True, False])
def test_an_original_at_a_newer_ir_is_given_as_a_lowered_copy(monkeypatch, tmp_path, rng, inline):
    import lrdeploy.runtime.verification as verification

    model = _mlp(rng)
    model.ir_version = 14  # what onnx 1.23 writes by default; onnxruntime refuses it
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded, _ = lrdeploy.io.modelio.load_model(path)
    if not inline:
        monkeypatch.setattr(verification, "INLINE_SOURCE_BYTES", 0)
    with verification.runtime_source(loaded, path) as source:
        assert isinstance(source, bytes) == inline
        lowered = onnx.load_from_string(source) if inline else onnx.load(source)
        assert lowered.ir_version <= 10 and lowered.graph == model.graph
        make_session(source, Device("cpu"))  # onnxruntime reads it
    assert inline or not source.exists()
    assert loaded.ir_version == 14
