"""`lrdeploy bench` and `lrdeploy env` on the CPU: structure and arithmetic, not speed (that is measured
in benchmarks/, never asserted in unit tests)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import lrdeploy
from lrdeploy.cli.app import main
from lrdeploy.errors import RuntimeFailure, UsageError
from lrdeploy.runtime.bench import BenchConfig, BenchResult, Timing, benchmark
from models import graph_model, weight


@pytest.fixture
def two_models(tmp_path):
    rng = np.random.default_rng(0)
    model = graph_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        {"x": ["batch", 64]},
        {"y": ["batch", 64]},
        {"w": weight(rng, 64, 64)},
    )
    original = tmp_path / "dense.onnx"
    onnx.save(model, original)
    small = tmp_path / "small.onnx"
    lrdeploy.compress(original, rank_ratio=0.25, output=small, verify=False)
    fixed = tmp_path / "fixed.onnx"
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, fixed)
    return original, small, fixed


def test_benchmark_interleaves_and_reports_efficiency(two_models):
    original, small, fixed = two_models
    config = BenchConfig(device="cpu", batch_sizes=(1, 4), warmup=1, runs=3, threads=1)
    result = benchmark([original, small, fixed], config)
    assert result.provider == "CPUExecutionProvider"
    assert {(t.model, t.batch) for t in result.timings} == {
        (str(original), 1),
        (str(small), 1),
        (str(fixed), 1),
        (str(original), 4),
        (str(small), 4),
    }
    assert result.skipped == [f"{fixed} at batch 4: its batch dim is fixed to 1"]
    dense = result.timing(str(original), 4)
    low = result.timing(str(small), 4)
    assert len(low.latencies_ms) == 3
    assert dense.macs == 4 * 64 * 64 and low.macs == 4 * 16 * 128
    assert result.mac_reduction(low) == pytest.approx(2.0)
    assert result.efficiency(low) == pytest.approx(result.speedup(low) / 2.0)
    assert result.speedup(dense) == 1.0
    table = result.to_markdown()
    assert table.count("\n") == 2 + len(result.timings)


def test_timing_statistics():
    timing = Timing("m", 8, (1.0, 2.0, 3.0, 4.0, 100.0), 10)
    assert timing.p50 == 3.0 and timing.mean == 22.0
    assert timing.throughput == pytest.approx(8 * 1000 / 3.0)
    assert timing.percentile(99) > timing.percentile(90) > timing.p50


def test_efficiency_is_none_without_macs():
    config = BenchConfig()
    result = BenchResult(
        "CPUExecutionProvider",
        None,
        config,
        ["a", "b"],
        [Timing("a", 1, (2.0,), None), Timing("b", 1, (1.0,), None)],
        [],
    )
    assert result.speedup(result.timings[1]) == 2.0
    assert result.efficiency(result.timings[1]) is None


@pytest.mark.parametrize("kwargs", [{"batch_sizes": ()}, {"batch_sizes": (0,)}, {"runs": 0}, {"threads": 0}])
def test_bench_config_validation(kwargs):
    with pytest.raises(UsageError):
        BenchConfig(**kwargs)


def test_bench_cli_json_and_plot(two_models, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    original, small, _ = two_models
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    args = [
        "bench",
        str(original),
        str(small),
        "--device",
        "cpu",
        "--batch",
        "1,2",
        "--runs",
        "2",
        "--warmup",
        "0",
    ]
    assert main([*args, "--json", str(out), "--plot", str(plot)]) == 0
    data = json.loads(out.read_text())
    assert data["provider"] == "CPUExecutionProvider" and len(data["results"]) == 4
    assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_per_s", "efficiency"} <= set(
        data["results"][1]
    )
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "median of 2 interleaved rounds" in capsys.readouterr().out


def test_bench_cli_bad_batch_is_a_usage_error(two_models, capsys):
    assert main(["bench", str(two_models[0]), "--batch", "1,x"]) == 2
    assert "--batch expects" in capsys.readouterr().err


def test_env_reports_versions_and_providers(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["onnx"] == onnx.__version__
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]
    assert info["cuda_runs"] == "yes" or info["cuda_runs"].startswith("no")


def test_config_errors_name_parameters_in_python_and_flags_on_the_command_line(capsys) -> None:
    with pytest.raises(UsageError, match=r"batch_sizes needs positive batch sizes, e\.g\. batch_sizes="):
        BenchConfig(batch_sizes=(0,))
    with pytest.raises(UsageError, match="threads must be"):
        BenchConfig(threads=0)
    assert main(["bench", "x.onnx", "--threads", "0"]) == 2
    assert "--threads must be ≥ 1" in capsys.readouterr().err


def test_bench_counts_macs_of_control_flow_like_the_report(tmp_path):
    """An If's branches are alternatives: bench's efficiency uses the report's total (the costlier branch),
    not the sum of both."""
    rng = np.random.default_rng(0)

    def branch(name: str, width: int) -> onnx.GraphProto:
        w = onnx.numpy_helper.from_array(weight(rng, 16, width), f"w_{name}")
        out = helper.make_tensor_value_info(f"y_{name}", onnx.TensorProto.FLOAT, ["batch", width])
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", w.name], [out.name], name)], name, [], [out], [w]
        )

    node = helper.make_node(
        "If", ["flag"], ["y"], "If_0", then_branch=branch("wide", 32), else_branch=branch("narrow", 4)
    )
    model = graph_model([node], {"x": ["batch", 16], "flag": []}, {"y": ["batch", None]}, {})
    model.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.BOOL
    path = tmp_path / "if.onnx"
    onnx.save(model, path)
    _, report = lrdeploy.compress(path, rank_ratio=1.0, verify=False)
    result = benchmark([path], BenchConfig(device="cpu", batch_sizes=(1,), warmup=1, runs=2))
    assert report.macs_before == 16 * 32  # the wider branch only
    assert result.timings[0].macs == report.macs_before


def test_bench_batches_a_state_on_its_batch_axis(tmp_path):
    """A recurrent state [2, batch, 16] takes the batch on axis 1; a scalar sample rate stays a scalar."""
    from control_flow import audio_if_model

    path = tmp_path / "audio.onnx"
    onnx.save(audio_if_model(), path)
    result = benchmark([path], BenchConfig(device="cpu", batch_sizes=(1, 4), warmup=1, runs=2))
    assert not result.skipped
    assert [t.batch for t in result.timings] == [1, 4]
    assert result.timings[1].macs == 4 * result.timings[0].macs


def test_a_model_that_fails_at_run_time_is_one_line(tmp_path):
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], "rs")
    model = graph_model([node], {"x": ["batch", 6]}, {"y": [4]}, {"shape": np.array([4], dtype=np.int64)})
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(RuntimeFailure, match=r"^onnxruntime failed to run .*bad\.onnx: .*rs") as error:
        benchmark([path], BenchConfig(device="cpu", warmup=1, runs=2))
    assert "\n" not in str(error.value)
