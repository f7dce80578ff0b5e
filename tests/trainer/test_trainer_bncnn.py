"""The ``bncnn`` arch exports with its BN nodes, compresses exactly at full rank, and the bundled one keeps
issue 9's promise: a 30% MAC budget with whitened factors loses under a point of accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import onnx  # noqa: E402
from torch import nn  # noqa: E402

import lrdeploy  # noqa: E402
from lrdeploy.trainer.archs import InputSpec, build  # noqa: E402
from lrdeploy.trainer.data import load_dataset  # noqa: E402
from lrdeploy.trainer.export import export_onnx, onnx_logits  # noqa: E402
from lrdeploy.trainer.lrpet import LRPETConfig, project_  # noqa: E402

SPEC = InputSpec(1, 28, 28, 10, (0.1307,), (0.3081,))
BUNDLED = Path(__file__).resolve().parents[2] / "models" / "bncnn_baseline.onnx"


def _exported(tmp_path: Path, seed: int = 0, rank_ratio: float | None = None) -> tuple[nn.Module, Path]:
    """A bncnn with trained-like BN statistics (optionally LRPET-projected), exported to ONNX."""
    torch.manual_seed(seed)
    model = build("bncnn", SPEC)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.3, 3.0)
    model.eval()
    if rank_ratio is not None:
        project_(model, LRPETConfig(rank_ratio=rank_ratio), final=True)
    path = tmp_path / "bncnn.onnx"
    export_onnx(model, SPEC.shape, path)
    return model, path


def test_bncnn_exports_bn_nodes_and_matches_torch(tmp_path: Path) -> None:
    model, path = _exported(tmp_path)
    proto = onnx.load(path)
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("BatchNormalization") == 4 and ops.count("Conv") == 4 and ops.count("Gemm") == 2
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == [
        "logits"
    ]
    x = torch.rand(3, *SPEC.shape)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(onnx_logits(path, x.numpy()), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{"rank_ratio": 1.0}, {"target_macs": 1.0}])
def test_bncnn_at_full_rank_keeps_its_outputs(tmp_path: Path, options: dict) -> None:
    _, path = _exported(tmp_path)
    _, report = lrdeploy.compress(path, output=tmp_path / "c.onnx", **options)
    assert all(row["status"] == "folded" for row in report.batchnorm) and len(report.batchnorm) == 4
    x = np.random.default_rng(0).random((16, *SPEC.shape), dtype=np.float32)
    before, after = onnx_logits(path, x), onnx_logits(tmp_path / "c.onnx", x)
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 1e-5


def test_bncnn_at_its_trained_rank_compresses_exactly(tmp_path: Path) -> None:
    """LRPET-projected weights are exactly rank ρ·min(m, n) after BN folding: the pairs reproduce them."""
    _, path = _exported(tmp_path, seed=1, rank_ratio=0.25)
    _, report = lrdeploy.compress(path, rank_ratio=0.25, output=tmp_path / "c.onnx")
    assert sum(1 for layer in report.layers if layer.decision.rank) >= 4
    assert report.macs_after < 0.5 * report.macs_before
    x = np.random.default_rng(1).random((16, *SPEC.shape), dtype=np.float32)
    before, after = onnx_logits(path, x), onnx_logits(tmp_path / "c.onnx", x)
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 1e-4


def test_bundled_bncnn_keeps_its_accuracy_at_thirty_percent_of_the_macs(tmp_path: Path) -> None:
    """Issue 9's bar on the shipped model, judged on 1,000 test digits (benchmarks/budget_mnist.py: all)."""
    assert BUNDLED.stat().st_size < 1_000_000
    data = load_dataset("mnist")
    x, y = data.x_test[:1000], data.y_test[:1000]
    dense = onnx_logits(BUNDLED, x)
    judged = {}
    for method in ("whiten", "svd"):
        output = tmp_path / f"{method}.onnx"
        calib = {"calib": "mnist", "calib_samples": 256} if method == "whiten" else {}
        _, report = lrdeploy.compress(
            BUNDLED, target_macs=0.3, method=method, verify=False, output=output, **calib
        )
        assert abs(report.macs_after / report.macs_before - 0.3) <= 0.01
        logits = onnx_logits(output, x)
        judged[method] = (
            np.linalg.norm(logits - dense) / np.linalg.norm(dense),
            np.mean(logits.argmax(1) == y),
        )
    assert judged["whiten"][0] <= 0.6 * judged["svd"][0]
    assert np.mean(dense.argmax(1) == y) - judged["whiten"][1] <= 0.01
