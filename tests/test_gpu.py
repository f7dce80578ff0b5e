"""CUDA execution provider checks: they run where a CUDA EP really starts and skip cleanly elsewhere."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import lrdeploy
from lrdeploy.errors import DeviceUnavailable
from lrdeploy.runtime.sessions import CUDA, probe_provider, select_device
from models import graph_model, weight

cuda_reason = probe_provider(CUDA)
needs_cuda = pytest.mark.skipif(cuda_reason is not None, reason=f"no CUDA EP: {cuda_reason}")


def _conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return graph_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        {"x": ["N", 16, 12, 12]},
        {"y": ["N", 32, 12, 12]},
        {"w": weight(rng, 32, 16, 3, 3, scale=0.1), "b": weight(rng, 32)},
    )


def test_auto_falls_back_to_cpu_quietly_or_uses_cuda():
    device = select_device("auto")
    assert device.provider == (CUDA if cuda_reason is None else "CPUExecutionProvider")


@pytest.mark.skipif(cuda_reason is None, reason="CUDA works here")
def test_strict_cuda_fails_in_one_line_without_cuda():
    with pytest.raises(DeviceUnavailable, match="device='cuda'") as caught:
        select_device("cuda")
    assert "\n" not in str(caught.value)


@needs_cuda
def test_compress_verifies_on_cuda_with_tf32_off():
    device = select_device("cuda")
    assert dict(device.providers)[CUDA]["use_tf32"] == "0"
    _, report = lrdeploy.compress(
        _conv_model(), rank_ratio=1.0, device="cuda", input_shapes={"x": (4, 16, 12, 12)}
    )
    assert report.verification.provider == CUDA
    assert report.verification.rel_l2 <= 1e-5


@needs_cuda
def test_bench_on_cuda_uses_device_buffers(tmp_path):
    from lrdeploy.runtime.bench import BenchConfig, benchmark

    path = tmp_path / "m.onnx"
    onnx.save(_conv_model(), path)
    result = benchmark([path], BenchConfig(device="cuda", batch_sizes=(1, 8), warmup=2, runs=5))
    assert result.provider == CUDA and len(result.timings) == 2


@needs_cuda
def test_bench_with_cuda_graph_replays(tmp_path):
    from lrdeploy.runtime.bench import BenchConfig, benchmark

    path = tmp_path / "m.onnx"
    onnx.save(_conv_model(), path)
    config = BenchConfig(device="cuda", batch_sizes=(2,), warmup=2, runs=5, cuda_graph=True, tf32=False)
    result = benchmark([path], config)
    assert result.to_dict()["cuda_graph"] is True and len(result.timings[0].latencies_ms) == 5


def test_cuda_graph_needs_cuda(tmp_path):
    from lrdeploy.errors import UsageError
    from lrdeploy.runtime.bench import BenchConfig, benchmark

    if cuda_reason is None:
        pytest.skip("CUDA works here")
    path = tmp_path / "m.onnx"
    onnx.save(_conv_model(), path)
    with pytest.raises(UsageError, match="cuda_graph needs the CUDA EP"):
        benchmark([path], BenchConfig(device="auto", cuda_graph=True))


def test_fallback_message_becomes_a_one_line_reason():
    """onnxruntime prints 'EP Error ...' on stdout when a provider fails; seen on an H100 without TensorRT."""
    from lrdeploy.runtime.sessions import _fallback_reason

    printed = (
        "*************** EP Error ***************\n"
        "EP Error /onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:729 void onnxruntime::"
        "python::RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const onnxruntime::ProviderOptions&) "
        "Please install TensorRT libraries as mentioned in the GPU requirements page, make sure they're in "
        "the PATH or LD_LIBRARY_PATH, and that your GPU is supported.\n"
        " when using ['TensorrtExecutionProvider', 'CPUExecutionProvider']\n"
        "Falling back to ['CPUExecutionProvider'] and retrying.\n"
    )
    assert (
        _fallback_reason(printed)
        == "Please install TensorRT libraries as mentioned in the GPU requirements page"
    )
    assert _fallback_reason("nothing went wrong\n") == ""
