"""Gradient compression hooks: exact at full rank, the residual carried exactly, bytes counted, CLI checks.

The hooks run for real: two gloo processes on the CPU (``torch.multiprocessing.spawn``), a tiny conv + linear
model under DDP, different data on each process. One spawn runs every case and writes what it measured; the
tests below read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from lrdeploy.trainer import gradcomp  # noqa: E402
from lrdeploy.trainer.__main__ import main  # noqa: E402

WORLD = 2
STEPS = 4  # step 0 is GreedyLore's refresh, steps 1-3 compress


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on both processes, as DDP expects
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))


def _local_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _mean(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / WORLD


def _batches(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)  # each process its own data
    return [torch.randn(3, 2, 6, 6, generator=generator) for _ in range(STEPS)]


def _ddp_grads(ddp: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    ddp.zero_grad(set_to_none=True)
    ddp(x).square().sum().backward()
    return [p.grad.detach().clone() for p in ddp.module.parameters()]


def _full_rank(rank: int) -> dict:
    """Rank ≥ every matrix's small side, every matrix compressed: the hook must equal all-reduce."""
    plain, ddp = _model(), nn.parallel.DistributedDataParallel(_model())
    state = gradcomp.GreedyLoreState(rank=64, min_saving=0.0, seed=1)
    ddp.register_comm_hook(state, gradcomp.greedylore_hook)
    worst = []
    for x in _batches(rank):
        expected = [_mean(g) for g in _local_grads(plain, x)]
        got = _ddp_grads(ddp, x)
        worst.append(max((a - b).abs().max().item() for a, b in zip(got, expected, strict=True)))
    return {"worst": worst, "compressed": len(state.bases)}


def _residual(rank: int, estimator: str) -> dict:
    """Rank 1: the new error is exactly Y − B_S Bᵀ_S Y, and what DDP applies is the mean of what was sent."""
    plain, ddp = _model(), nn.parallel.DistributedDataParallel(_model())
    state = gradcomp.GreedyLoreState(rank=1, min_saving=0.0, seed=1, estimator=estimator, keep_energy=0.0)
    ddp.register_comm_hook(state, gradcomp.greedylore_hook)
    keys = [id(p) for p in ddp.module.parameters()]
    out: dict = {"residual": [], "applied": [], "ranks": [], "bytes": []}
    for x in _batches(rank):
        old = {k: e.clone() for k, e in state.errors.items()}
        local = _local_grads(plain, x)
        before = state.meter.bytes
        got = _ddp_grads(ddp, x)
        out["bytes"].append(state.meter.bytes - before)
        if not old:
            continue  # the refresh step: full gradient sent, errors zero
        for key, g, applied in zip(keys, local, got, strict=True):
            if key not in state.bases:
                continue
            y = gradcomp.oriented(g.view(g.shape[0], -1)) + old[key]
            basis, chosen = state.bases[key], state.chosen[key]
            expected = y - gradcomp.lift(basis, chosen, (basis.T @ y)[chosen])
            out["residual"].append((state.errors[key] - expected).abs().max().item())
            sent_mean = _mean(y - state.errors[key])
            out["applied"].append(
                (gradcomp.oriented(applied.view(g.shape[0], -1)) - sent_mean).abs().max().item()
            )
            out["ranks"].append(int(torch.linalg.matrix_rank(applied.view(g.shape[0], -1))))
    return out


def _stale(rank: int) -> dict:
    """keep_energy = 1: rank 1 never keeps all the energy, so a refresh follows every compressed step."""
    ddp = nn.parallel.DistributedDataParallel(_model())
    state = gradcomp.GreedyLoreState(rank=1, min_saving=0.0, keep_energy=1.0)
    ddp.register_comm_hook(state, gradcomp.greedylore_hook)
    steps = []
    for x in _batches(rank):
        before = state.meter.bytes
        _ddp_grads(ddp, x)
        steps.append(state.meter.bytes - before)
    return {"steps": steps, "summary": state.meter.summary()}


def _meters(rank: int) -> dict:
    """Bytes per step of the all-reduce and PowerSGD wrappers."""
    out = {}
    for method in ("none", "powersgd"):
        ddp = nn.parallel.DistributedDataParallel(_model())
        meter = gradcomp.register(ddp, method, 1)
        steps = []
        for x in _batches(rank):
            before = meter.bytes
            _ddp_grads(ddp, x)
            steps.append(meter.bytes - before)
        out[method] = {"steps": steps, "counted": meter.steps}
    return out


def _worker(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        found = {
            "full_rank": _full_rank(rank),
            "energy": _residual(rank, "energy"),
            "probe": _residual(rank, "probe"),
            "stale": _stale(rank),
            "meters": _meters(rank),
        }
    finally:
        dist.destroy_process_group()
    Path(results, f"rank{rank}.json").write_text(json.dumps(found))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    where = tmp_path_factory.mktemp("gradcomp")
    mp.spawn(_worker, args=(str(where / "store"), str(where)), nprocs=WORLD, join=True)
    return [json.loads((where / f"rank{r}.json").read_text()) for r in range(WORLD)]


NUMEL = 4 * 2 * 3 * 3 + 4 + 5 * 64 + 5  # conv weight, conv bias, linear weight, linear bias


def test_full_rank_greedylore_equals_all_reduce(measured) -> None:
    for found in measured:
        assert found["full_rank"]["compressed"] == 2  # both weights went through the compressor
        assert max(found["full_rank"]["worst"]) < 1e-4


@pytest.mark.parametrize("estimator", ["energy", "probe"])
def test_error_feedback_carries_exactly_the_residual(measured, estimator) -> None:
    for found in measured:
        residual = found[estimator]
        assert len(residual["residual"]) == 2 * (STEPS - 1)
        assert max(residual["residual"]) < 1e-5
        assert max(residual["applied"]) < 1e-5  # applied = mean of (Y − new error) = mean of what was sent
        assert residual["ranks"] == [1] * (2 * (STEPS - 1))


def test_greedylore_bytes(measured) -> None:
    # Refresh: the whole bucket. Compressed: k probe scores per matrix (4 + 5), the biases (4 + 5) and
    # r · max(n, m) coefficients (18 + 64), in float32.
    for case in ("energy", "probe"):
        assert measured[0][case]["bytes"] == [4 * NUMEL] + [4 * (9 + 9 + 18 + 64)] * (STEPS - 1)


def test_a_stale_basis_is_refreshed_at_the_next_step(measured) -> None:
    stale = measured[0]["stale"]
    compressed = 4 * (9 + 9 + 18 + 64)
    assert stale["steps"] == [4 * NUMEL, compressed, 4 * NUMEL, compressed]
    assert stale["summary"]["basis_refreshes"] == 2 * 2  # two matrices, refreshed at steps 0 and 2


def test_all_reduce_and_powersgd_bytes(measured) -> None:
    meters = measured[0]["meters"]
    assert meters["none"] == {"steps": [4 * NUMEL] * STEPS, "counted": STEPS}
    # Two vanilla steps, then P and Q: (n + m) · r per matrix, (4 + 18) + (5 + 64), plus the 9 biases.
    powersgd = [4 * NUMEL] * gradcomp.POWERSGD_START + [4 * (22 + 69 + 9)] * (STEPS - gradcomp.POWERSGD_START)
    assert meters["powersgd"] == {"steps": powersgd, "counted": STEPS}


def test_full_basis_is_orthonormal_and_lifts_back() -> None:
    y = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    basis = gradcomp.full_basis(y)
    torch.testing.assert_close(basis.T @ basis, torch.eye(5), atol=1e-5, rtol=0)
    every = torch.arange(5)
    torch.testing.assert_close(gradcomp.lift(basis, every, basis.T @ y), y, atol=1e-5, rtol=0)
    assert gradcomp.oriented(torch.zeros(7, 3)).shape == (3, 7)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grad-compress", "greedylore"], "--grad-compress greedylore compresses data-parallel gradients"),
        (["--grad-compress", "powersgd", "--grad-rank", "2"], "launch with torchrun"),
        (["--grad-compress", "topk"], "unknown --grad-compress 'topk'"),
        (["--grad-rank", "2"], "--grad-rank applies to --grad-compress powersgd or greedylore"),
        (["--grad-compress", "greedylore", "--grad-rank", "0"], "--grad-rank must be a positive integer"),
    ],
)
def test_grad_compress_flags_are_one_line_usage_errors(argv, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--subset", "16", "--epochs", "1", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_config_keeps_the_compression() -> None:
    from lrdeploy.trainer.config import TrainConfig

    data = TrainConfig(grad_compress="greedylore", grad_rank=2).to_dict()  # as checkpoints and cards hold it
    assert (data["grad_compress"], data["grad_rank"]) == ("greedylore", 2)
    again = TrainConfig.from_dict(data)
    assert (again.grad_compress, again.grad_rank) == ("greedylore", 2)
    assert TrainConfig(grad_compress="powersgd").to_dict()["grad_rank"] == 4  # the default, stated
    assert TrainConfig().to_dict()["grad_rank"] is None
    old = {k: v for k, v in data.items() if not k.startswith("grad_")}  # a checkpoint from before the option
    assert TrainConfig.from_dict(old).grad_compress == "none"
