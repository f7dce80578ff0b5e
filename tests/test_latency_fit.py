"""The latency table calibrated end to end (`lrdeploy.runtime.latencyfit`): the fit itself, and
`compress` with injected timings where whole models take ``fixed + scale × their layers alone``."""

from __future__ import annotations

import json

import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_budget import _net
from test_latency import FakeClock, _compress

from lrdeploy.runtime import latency, latencyfit, latencyguard
from lrdeploy.runtime.latencyfit import Probe, fit


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRDEPLOY_CACHE", str(tmp_path / "cache"))


def _predict(calibration: latencyfit.Calibration, layers_ms: float) -> float:
    return (calibration.fixed + calibration.scale * layers_ms) / calibration.total


@given(
    scale=st.floats(0.2, 5.0),
    fixed=st.floats(0.0, 3.0),
    layers=st.lists(st.floats(0.05, 0.95), min_size=1, max_size=3, unique=True),
    target=st.floats(0.1, 0.95) | st.none(),
)
def test_points_on_a_line_are_fitted_exactly(scale, fixed, layers, target):
    """Whole model = fixed + scale × Σ layers: any probes recover it, wherever the target is."""
    layers_dense = 10.0
    dense = fixed + scale * layers_dense
    probes = [Probe(f * layers_dense, (fixed + scale * f * layers_dense) / dense) for f in layers]
    calibration = fit(dense, layers_dense, probes, target)
    assert calibration.total == dense
    assert calibration.scale == pytest.approx(scale, rel=1e-6)
    assert calibration.fixed == pytest.approx(fixed, abs=1e-6 * dense)
    for f in (0.0, 0.5, 1.0):
        assert _predict(calibration, f * layers_dense) == pytest.approx((fixed + scale * f * 10) / dense)


def test_the_segment_around_the_target_is_used():
    """Points off one line (what ResNet-50 measured): the chord through the two around the target."""
    probes = [Probe(20.0, 0.2), Probe(40.0, 0.7)]
    calibration = fit(200.0, 100.0, probes, target=0.8)
    assert _predict(calibration, 40.0) == pytest.approx(0.7)
    assert _predict(calibration, 100.0) == pytest.approx(1.0)
    assert "exact at 0.7 and 1" in calibration.note


def test_a_negative_intercept_becomes_the_pessimistic_line_through_zero():
    """Costs must be ≥ 0: a chord crossing below 0 is replaced by the line through 0 and its upper point,
    which predicts more than the chord (never less) below that point."""
    probes = [Probe(20.0, 0.2), Probe(40.0, 0.7)]  # the chord 0.2→0.7 crosses 0 at 12 ms
    calibration = fit(200.0, 100.0, probes, target=0.4)
    assert calibration.fixed == 0.0 and _predict(calibration, 40.0) == pytest.approx(0.7)
    chord = lambda ms: 0.2 + (ms - 20.0) * 0.5 / 20.0  # noqa: E731
    assert all(_predict(calibration, ms) >= chord(ms) for ms in (12.0, 20.0, 30.0))
    assert "through 0" in calibration.note


def test_a_target_below_every_measurement_is_out_of_reach():
    """The chord from the fastest probe to dense: the cheapest plan is predicted as measured."""
    calibration = fit(200.0, 100.0, [Probe(40.0, 0.7), Probe(20.0, 0.5)], target=0.3)
    assert _predict(calibration, 20.0) == pytest.approx(0.5) and _predict(calibration, 100.0) == 1.0


def test_probes_no_faster_than_dense_leave_the_table_as_measured():
    calibration = fit(200.0, 100.0, [Probe(60.0, 1.1)], target=0.8)
    assert calibration.scale == 1.0 and "no probe measured faster" in calibration.note


def test_without_probes_the_table_is_taken_as_measured():
    calibration = fit(80.0, 100.0)
    assert (calibration.scale, calibration.fixed, calibration.total) == (1.0, 0.0, 100.0)
    assert calibration.note.startswith("uncalibrated")
    assert fit(150.0, 100.0).fixed == 50.0  # what the layers leave of the dense model


def _truth(clock: FakeClock, model: onnx.ModelProto) -> float:
    return clock.whole(model) / clock.whole(_net())


def test_the_calibrated_prediction_is_what_the_whole_model_measures(monkeypatch):
    """Layers alone take twice what they take in the model, plus a fixed 0.2 ms per model: uncalibrated,
    the table mispredicts the plan; calibrated, its fraction is the measured one."""
    clock = FakeClock(scale=0.5, fixed=0.2)
    monkeypatch.setattr(latency, "_measure", clock)
    model, report = _compress(target_latency=0.7)
    about = report.latency
    predicted = about["predicted_ms"] / about["dense_predicted_ms"]
    assert predicted == pytest.approx(_truth(clock, model), abs=0.02)
    assert report.factorized and about["calibration"]["probes"]
    calibrated = about["calibration"]
    layers = (about["predicted_ms"] - calibrated["fixed_ms"]) / calibrated["scale"]  # the plan's Σ layers
    raw = fit(calibrated["measured_dense_ms"], calibrated["layers_dense_ms"])  # the same table, as measured
    assert abs((raw.fixed + layers) / raw.total - _truth(clock, model)) > 0.05


def test_a_layer_made_slower_stays_dense_when_calibrated(monkeypatch):
    monkeypatch.setattr(latency, "_measure", FakeClock(slower={(16, 16, 3, 3)}, scale=0.5, fixed=0.2))
    _, report = _compress(target_latency=0.8)
    rows = {x.decision.name: x.decision for x in report.layers}
    assert rows["conv2"].status == "skipped" and rows["conv2"].reason.startswith("slower on")
    assert report.latency["calibration"]["probes"]


def test_the_guard_still_backs_off_when_calibrated(monkeypatch):
    clock = FakeClock(scale=0.5, fixed=0.2, end_to_end=lambda call: (1.0, 1.5) if call < 3 else (1.0, 1.0))
    monkeypatch.setattr(latency, "_measure", clock)
    _, report = _compress(target_latency=0.7)
    assert report.latency["reverted"] and report.latency["speedup"] >= latencyguard.NOT_SLOWER


def test_a_table_from_elsewhere_without_probes_is_used_uncalibrated(monkeypatch, tmp_path):
    clock = FakeClock(scale=0.5, fixed=0.2)
    monkeypatch.setattr(latency, "_measure", clock)
    table = tmp_path / "target.json"
    _compress(target_latency=0.7, latency_table=table)
    document = json.loads(table.read_text())
    probes = [key for key in document["models"] if f"{key}:dense" in document["models"]]
    assert probes
    for key in probes:
        del document["models"][key], document["models"][f"{key}:dense"]
    document["environment"]["device"] = "the target box"  # an older table, measured elsewhere
    table.write_text(json.dumps(document))
    timed = clock.models
    _, report = _compress(target_latency=0.7, latency_table=table)
    assert clock.models == timed and report.latency["calibration"]["note"].startswith("uncalibrated")


def test_the_probe_is_the_model_with_its_layers_factorized():
    model = _net()
    probe = latencyfit.probe_model(model, {("conv2",): 3, ("fc1",): 5})
    onnx.checker.check_model(probe, full_check=True)
    assert [n.op_type for n in probe.graph.node].count("Conv") == 3
    assert len(probe.graph.node) == len(model.graph.node) + 2
