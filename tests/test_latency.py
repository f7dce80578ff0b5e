"""Latency as a budget cost (`lrdeploy.runtime.latency`): the table, its cache, slower layers, the
end-to-end guarantee, table files and the CLI flags. Timings are injected (a fake `_measure`) so that
every assertion holds on a busy machine; one test times for real."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_budget import SHAPES, _net

import lrdeploy
from lrdeploy.cli.app import main
from lrdeploy.errors import UsageError
from lrdeploy.runtime import latency, latencyguard, latencytable
from lrdeploy.runtime.bench import Timing


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRDEPLOY_CACHE", str(tmp_path / "cache"))


def _weights(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    return [tuple(t.dims) for t in model.graph.initializer]


class FakeClock:
    """Milliseconds from the weights a model holds (a pair of rank r: r·(m+n) elements), so that a
    factorized layer is faster than dense; ``slower`` names dense weight shapes whose pairs take twice
    the dense time; ``end_to_end`` gives (input, output) ms per call of the end-to-end check. A whole
    model takes ``fixed`` + ``scale`` × what its layers take alone (the calibration's truth)."""

    def __init__(self, slower=(), end_to_end=None, scale=1.0, fixed=0.1):
        self.slower, self.scale, self.fixed = set(slower), scale, fixed
        self.end_to_end = end_to_end or (lambda call: (1.0, 0.5))
        self.layers = self.models = self.checks = 0

    def whole(self, model):
        return self.fixed + self.scale * sum(int(np.prod(s)) for s in _weights(model) if len(s) > 1) * 1e-5

    def __call__(self, models, device, bench, shapes):
        def timing(name, ms):
            return Timing(name, 1, (ms,), None)

        if set(models) == {"input", "output"}:
            self.checks += 1
            before, after = self.end_to_end(self.checks)
            return {"input": timing("input", before), "output": timing("output", after)}
        if "model" in models:  # the dense model, alone or with a probe (a compressed model)
            self.models += 1
            return {name: timing(name, self.whole(model)) for name, model in models.items()}
        self.layers += 1
        dense_shapes = _weights(models["dense"])
        dense = 0.01 + sum(int(np.prod(s)) for s in dense_shapes) * 1e-5
        out = {"dense": timing("dense", dense), "null": timing("null", 0.01)}
        for name, model in models.items():
            if name.startswith("r"):
                ms = 0.01 + sum(int(np.prod(s)) for s in _weights(model) if len(s) > 1) * 1e-5
                ms = 2 * dense if set(dense_shapes) & self.slower else ms
                out[name] = timing(name, ms)
        return out


def _compress(**options):
    return lrdeploy.compress(_net(), input_shapes=SHAPES, verify=False, device="cpu", **options)


def test_the_table_is_cached_and_a_second_compress_profiles_nothing(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(latency, "_measure", clock)
    _, first = _compress(target_latency=0.7)
    probes = len(first.latency["calibration"]["probes"])
    assert clock.layers == 4 and clock.models == 1 + probes and first.latency["profiled"] == 5 + probes
    _, second = _compress(target_latency=0.7)
    assert clock.layers == 4 and clock.models == 1 + probes  # nothing more profiled
    assert second.latency["profiled"] == 0 and "nothing profiled" in " ".join(second.notes)
    ranks = [(x.decision.name, x.decision.rank) for x in first.layers]
    assert ranks == [(x.decision.name, x.decision.rank) for x in second.layers]
    assert first.budget["kind"] == "latency" and first.budget["planned"] <= 0.7 + 0.01


def test_a_changed_setting_is_measured_again(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(latency, "_measure", clock)
    _compress(target_latency=0.7)
    _compress(target_latency=0.7, latency_batch=4)  # another batch: other shapes, another table
    assert clock.layers == 8


def test_a_layer_slower_factorized_stays_dense_with_the_reason(monkeypatch):
    monkeypatch.setattr(latency, "_measure", FakeClock(slower={(16, 16, 3, 3)}))
    _, report = _compress(target_latency=0.5)
    rows = {x.decision.name: x.decision for x in report.layers}
    assert rows["conv2"].status == "skipped"
    assert rows["conv2"].reason.startswith("slower on CPUExecutionProvider")
    assert any(d.status == "factorized" for d in rows.values())


def test_latency_as_a_constraint_removes_slower_candidates_from_a_mac_budget(monkeypatch):
    monkeypatch.setattr(latency, "_measure", FakeClock(slower={(16, 16, 3, 3)}))
    _, free = lrdeploy.compress(_net(), input_shapes=SHAPES, verify=False, target_macs=0.7)
    _, bound = _compress(cost="latency", target_macs=0.7)
    assert {x.decision.name: x.decision.status for x in free.layers}["conv2"] == "factorized"
    fc1 = {x.decision.name: x.decision for x in bound.layers}["conv2"]
    assert fc1.status == "skipped" and "slower on" in fc1.reason
    assert bound.budget["kind"] == "macs" and bound.latency is not None


def test_the_end_to_end_guarantee_reverts_layers_until_not_slower(monkeypatch):
    clock = FakeClock(end_to_end=lambda call: (1.0, 1.5) if call < 3 else (1.0, 1.0))
    monkeypatch.setattr(latency, "_measure", clock)
    model, report = _compress(target_latency=0.6)
    check = report.latency
    assert clock.checks == 3  # slower, confirmed slower (reverted), then not slower
    assert check["rounds"] == 2 and check["speedup"] >= latencyguard.NOT_SLOWER and check["reverted"]
    rows = {x.decision.name: x.decision for x in report.layers}
    for name in check["reverted"]:
        assert rows[name].status == "skipped" and rows[name].reason.startswith("reverted to dense")
    kept = [n for n, d in rows.items() if d.status == "factorized"]
    pairs = [node.name for node in model.graph.node if "lowrank" in node.name or node.op_type == "Conv"]
    assert len(model.graph.node) < 9 + 2 * len(kept) + 2 * len(check["reverted"]) or not check["reverted"]
    assert pairs  # the model is still whole
    onnx.checker.check_model(model, full_check=True)


def test_one_slow_measurement_is_confirmed_before_reverting(monkeypatch):
    clock = FakeClock(end_to_end=lambda call: (1.0, 1.03) if call == 1 else (1.0, 0.9))  # pooled: 0.965
    monkeypatch.setattr(latency, "_measure", clock)
    _, report = _compress(target_latency=0.6)
    assert clock.checks == 2 and report.latency["reverted"] == [] and report.factorized


def test_an_output_that_stays_slower_ends_with_every_layer_dense(monkeypatch):
    monkeypatch.setattr(latency, "_measure", FakeClock(end_to_end=lambda call: (1.0, 2.0)))
    model, report = _compress(target_latency=0.6)
    assert not report.factorized
    assert report.latency["speedup"] < latencyguard.NOT_SLOWER  # measured, and said: nothing left to revert
    assert all(n.op_type != "BatchNormalization" for n in model.graph.node)  # the folded input


def test_a_latency_table_file_is_written_and_read_elsewhere(monkeypatch, tmp_path):
    clock = FakeClock()
    monkeypatch.setattr(latency, "_measure", clock)
    table = tmp_path / "target.json"
    _compress(target_latency=0.7, latency_table=table)
    document = json.loads(table.read_text())
    assert document["schema"] == latencytable.SCHEMA and len(document["layers"]) == 4
    document["environment"]["device"] = "the target box"  # measured elsewhere: used, not re-measured
    table.write_text(json.dumps(document))
    checks = clock.checks
    _, report = _compress(target_latency=0.7, latency_table=table)
    assert clock.layers == 4 and report.latency["profiled"] == 0
    assert clock.checks == checks and report.latency["check"].startswith("skipped")  # not this machine's


def test_a_table_from_elsewhere_without_this_layer_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(latency, "_measure", FakeClock())
    table = tmp_path / "target.json"
    _compress(target_latency=0.7, latency_table=table)
    document = json.loads(table.read_text())
    document["environment"]["device"] = "the target box"
    document["layers"].popitem()
    table.write_text(json.dumps(document))
    with pytest.raises(UsageError, match="has no entry for layer"):
        _compress(target_latency=0.7, latency_table=table)


BAD_TABLES = {
    "not json": "{not json",
    "a list": "[]",
    "another schema": json.dumps({"schema": 99, "environment": {}, "layers": {}, "models": {}}),
    "no layers": json.dumps({"schema": 1, "environment": {}, "models": {}}),
    "negative ms": json.dumps(
        {"schema": 1, "environment": {}, "layers": {"k": {"dense_ms": -1, "pairs_ms": {}}}, "models": {}}
    ),
    "rank 0": json.dumps(
        {"schema": 1, "environment": {}, "layers": {"k": {"dense_ms": 1, "pairs_ms": {"0": 1}}}, "models": {}}
    ),
    "text ms": json.dumps({"schema": 1, "environment": {}, "layers": {}, "models": {"m": "fast"}}),
}


@pytest.mark.parametrize("content", BAD_TABLES.values(), ids=BAD_TABLES.keys())
def test_bad_latency_table_files_are_one_line_errors(content, tmp_path, capsys):
    table = tmp_path / "bad.json"
    table.write_text(content)
    with pytest.raises(UsageError) as error:
        _compress(target_latency=0.7, latency_table=table)
    assert "\n" not in str(error.value) and str(table) in str(error.value)
    model = tmp_path / "m.onnx"
    onnx.save(_net(), model)
    code = main(
        ["compress", str(model), "--target-latency", "0.7", "--latency-table", str(table), "--no-verify"]
    )
    err = capsys.readouterr().err
    assert (code == 2 and "--latency-table" in err) or "latency table" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3  # one line, soft-wrapped


def test_the_cli_flags_reach_the_config(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(latency, "_measure", FakeClock())
    model, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(_net(batch=2), model)
    argv = ["compress", str(model), "-o", str(out), "--report", str(report), "--no-verify"]
    flags = ["--target-latency", "0.7", "--batch", "2", "--threads", "1", "--device", "cpu"]
    assert main(argv + flags) == 0
    data = json.loads(report.read_text())
    assert data["budget"]["kind"] == "latency" and data["latency"]["batch"] == 2
    assert "latency on CPUExecutionProvider" in capsys.readouterr().out


def test_a_fixed_batch_dim_is_the_batch_timed(monkeypatch):
    shapes = []
    clock = FakeClock()

    def spy(models, device, bench, feeds):
        shapes.append(next(iter(feeds.values())))
        return clock(models, device, bench, feeds)

    monkeypatch.setattr(latency, "_measure", spy)
    _, report = lrdeploy.compress(_net(batch=2), input_shapes=SHAPES, verify=False, target_latency=0.7)
    assert report.latency["batch"] == 2 and shapes[-1] == (2, 4, 8, 8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_latency": 0.5, "cost": "macs"}, "give only one"),
        ({"target_latency": 0.5, "target": 0.5, "cost": "latency"}, "give only one"),
        ({"target_macs": 0.5, "threads": 2}, "need cost latency"),
        ({"target_latency": 0.5, "latency_batch": 0}, "latency_batch must be a positive integer"),
        ({"rank_ratio": 0.5, "precision": "bf16"}, "precision must be fp32 or fp16"),
        ({"rank_ratio": 0.5, "quantize": "int8"}, "add calib"),
    ],
)
def test_option_errors(options, message):
    with pytest.raises(UsageError, match=message):
        lrdeploy.compress(_net(), input_shapes=SHAPES, verify=False, **options)


def test_gpu_ranks_are_rounded_for_tensor_cores():
    from lrdeploy.config import CompressConfig

    config = CompressConfig.build(target_latency=0.5, device="cuda")
    assert config.rank_multiple == 8
    assert CompressConfig.build(target_latency=0.5, device="cuda", rank_multiple=4).rank_multiple == 4
    assert (
        CompressConfig.build(rank_ratio=0.5, device="cuda", quantize="int8", calib="mnist").rank_multiple
        == 16
    )
    assert CompressConfig.build(target_latency=0.5, device="cpu").rank_multiple == 1


def test_real_timings_on_the_cpu_ep_are_never_slower():
    """No injection: the table is measured and the output is checked against the input. (A MAC budget
    under the latency constraint: on this tiny model, a latency target is out of reach when measured.)"""
    try:
        _, report = _compress(cost="latency", target_macs=0.7)
    except UsageError as error:  # measured, not injected: this machine may time no pair faster than dense
        if "out of reach" not in str(error):
            raise
        pytest.skip(f"this machine's timings leave the budget out of reach ({error})")
    check = report.latency
    assert check["profiled"] == 5 + len(check["calibration"]["probes"]) and check["measured_input_ms"] > 0
    assert check["speedup"] >= latencyguard.NOT_SLOWER or not report.factorized  # else all reverted


def _cuda_missing() -> bool:
    from lrdeploy.runtime.sessions import CUDA, probe_provider

    return probe_provider(CUDA) is not None


@pytest.mark.skipif(_cuda_missing(), reason="needs the CUDA EP (onnxruntime-gpu on a GPU machine)")
def test_latency_table_on_cuda():
    _, report = lrdeploy.compress(
        _net(), input_shapes=SHAPES, verify=False, device="cuda", target_latency=0.9
    )
    assert report.latency["provider"] == "CUDAExecutionProvider"
    assert all(x.decision.rank % 8 == 0 for x in report.factorized)


def test_two_budgets_are_named_as_the_caller_spelled_them():
    with pytest.raises(UsageError, match=r"^give only one of target_macs, target_latency$"):
        lrdeploy.CompressConfig(target_latency=0.5, target_macs=0.5)
