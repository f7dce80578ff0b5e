"""Gradient compression hooks: exact at full rank, the residual carried exactly, one basis on every worker,
bytes counted, CLI checks.

The hooks run for real: two gloo processes on the CPU (``torch.multiprocessing.spawn``), a tiny conv + linear
model under DDP, different data on each process. One spawn runs every case and writes what it measured; the
tests below read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

# One xdist worker runs the module: `measured` spawns a gloo group, set up once rather than once per worker.
pytestmark = pytest.mark.xdist_group("gradcomp")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from lrdeploy.trainer import gradcomp  # noqa: E402
from lrdeploy.trainer.__main__ import main  # noqa: E402

WORLD = 2
STEPS = 4  # step 0 refreshes GreedyLore's bases, steps 1-3 compress in them
PAPER = {"estimator": "probe", "refresh": "mean", "refresh_every": 100, "keep_energy": 0.0}
CASES = {  # GreedyLoreState keywords of the residual cases: the defaults, the probe, the paper's refresh
    "energy": {},
    "probe": {"estimator": "probe"},
    "paper": PAPER,
    "fixed": {"track": False},  # the defaults without their power step: the basis fixed between refreshes
    "block": {"greedy": False},  # always the tracked top block: PowerSGD's arithmetic
    "rows": {"warm_start": "rows"},  # the power step's warm start kept row by row
}


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


def _full_rank(rank: int, refresh: str) -> dict:
    """Rank ≥ every matrix's small side, every matrix compressed: the hook must equal all-reduce."""
    plain, ddp = _model(), nn.parallel.DistributedDataParallel(_model())
    state = gradcomp.GreedyLoreState(rank=64, min_saving=0.0, seed=1, refresh=refresh)
    ddp.register_comm_hook(state, gradcomp.greedylore_hook)
    worst = []
    for x in _batches(rank):
        expected = [_mean(g) for g in _local_grads(plain, x)]
        got = _ddp_grads(ddp, x)
        worst.append(max((a - b).abs().max().item() for a, b in zip(got, expected, strict=True)))
    return {"worst": worst, "compressed": len(state.bases)}


def _same_everywhere(state: gradcomp.GreedyLoreState) -> bool:
    """Whether every worker holds bitwise the same bases and chose the same directions (all-gathered)."""
    mine = torch.cat([torch.cat([state.bases[k].reshape(-1), state.chosen[k].float()]) for k in state.bases])
    every = [torch.empty_like(mine) for _ in range(WORLD)]
    dist.all_gather(every, mine)
    return all(torch.equal(every[0], other) for other in every[1:])


def _residual(rank: int, keywords: dict) -> dict:
    """Rank 1: the new error is exactly Y − B_S Bᵀ_S Y, and what DDP applies is the mean of what was sent."""
    plain, ddp = _model(), nn.parallel.DistributedDataParallel(_model())
    state = gradcomp.GreedyLoreState(rank=1, min_saving=0.0, seed=1, **{"keep_energy": 0.0, **keywords})
    ddp.register_comm_hook(state, gradcomp.greedylore_hook)
    keys = [id(p) for p in ddp.module.parameters()]
    out: dict = {"residual": [], "applied": [], "ranks": [], "bytes": [], "same": [], "off_block": []}
    for x in _batches(rank):
        old = {k: e.clone() for k, e in state.errors.items()}
        local = _local_grads(plain, x)
        before = state.meter.bytes
        got = _ddp_grads(ddp, x)
        out["bytes"].append(state.meter.bytes - before)
        out["same"].append(_same_everywhere(state) if state.chosen else True)
        out["off_block"].append(sum(int((c >= 1).sum()) for c in state.chosen.values()))  # rank 1: index ≥ 1
        for key, g, applied in zip(keys, local, got, strict=True):
            if key not in state.chosen or key not in state.errors or (not old and state.refresh == "mean"):
                continue  # a bias, or the paper's refresh step (the whole matrix sent, nothing left over)
            y = gradcomp.oriented(g.view(g.shape[0], -1)) + old.get(key, 0)
            basis, chosen = state.bases[key], state.chosen[key]
            expected = y - gradcomp.lift(basis, chosen, (basis.T @ y)[chosen])
            out["residual"].append((state.errors[key] - expected).abs().max().item())
            sent_mean = _mean(y - state.errors[key])
            out["applied"].append(
                (gradcomp.oriented(applied.view(g.shape[0], -1)) - sent_mean).abs().max().item()
            )
            out["ranks"].append(int(torch.linalg.matrix_rank(applied.view(g.shape[0], -1))))
    out["notes"] = state.meter.notes
    return out


def _stale(rank: int, refresh: str) -> dict:
    """keep_energy = 10 > 1 / (r/k): every basis is stale at every step, so every step refreshes ("gram"), or
    the step after each compressed one ("mean": a refresh sends the whole matrix, so it waits a step)."""
    ddp = nn.parallel.DistributedDataParallel(_model())
    state = gradcomp.GreedyLoreState(rank=1, min_saving=0.0, keep_energy=10.0, refresh=refresh)
    ddp.register_comm_hook(state, gradcomp.greedylore_hook)
    steps = []
    for x in _batches(rank):
        before = state.meter.bytes
        _ddp_grads(ddp, x)
        steps.append(state.meter.bytes - before)
    return {"steps": steps, "summary": state.meter.summary()}


TURN = 4  # the rotating case: the gradient's dominant direction turns by 90° after this many steps


def _rotating(rank: int, keywords: dict) -> list[float]:
    """Each step's sent share ‖mean Ŷ‖/‖mean Y‖ when the gradient's subspace turns (the paper's failure).

    The weight's gradient is set directly (loss Σ W ∘ T, so ∂/∂W = T): a strong rank-1 part u vᵀ the
    workers share, plus small noise of each worker's own; u jumps to a direction orthogonal to it at step
    TURN, where a basis built before the turn spreads the new u over its k − 1 other directions.
    """
    k, length = 16, 32
    shared, own = torch.Generator().manual_seed(7), torch.Generator().manual_seed(100 + rank)
    us, _ = torch.linalg.qr(torch.randn(k, 2, generator=shared))
    v = torch.randn(length, generator=shared)
    model = nn.Linear(length, k, bias=False)
    nn.init.zeros_(model.weight)
    ddp = nn.parallel.DistributedDataParallel(model)
    state = gradcomp.GreedyLoreState(rank=1, min_saving=0.0, **keywords)
    ddp.register_comm_hook(state, gradcomp.greedylore_hook)
    shares = []
    for step in range(2 * TURN):
        target = torch.outer(us[:, int(step >= TURN)], v) + 0.05 * torch.randn(k, length, generator=own)
        errors = next(iter(state.errors.values()), torch.zeros(k, length))
        wanted = _mean(
            target + errors
        )  # what plain all-reduce of the error-compensated gradients would apply
        ddp.zero_grad(set_to_none=True)
        (ddp(torch.eye(length)) * target.T).sum().backward()
        shares.append((model.weight.grad.norm() / wanted.norm()).item())
    return shares


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
            "full_rank": {refresh: _full_rank(rank, refresh) for refresh in ("gram", "mean")},
            **{case: _residual(rank, keywords) for case, keywords in CASES.items()},
            "stale": {refresh: _stale(rank, refresh) for refresh in ("gram", "mean")},
            "meters": _meters(rank),
            "rotating": {case: _rotating(rank, keywords) for case, keywords in CASES.items()},
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


@pytest.mark.parametrize("refresh", ["gram", "mean"])
def test_full_rank_greedylore_equals_all_reduce(measured, refresh) -> None:
    for found in measured:
        assert found["full_rank"][refresh]["compressed"] == 2  # both weights went through the compressor
        assert max(found["full_rank"][refresh]["worst"]) < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_error_feedback_carries_exactly_the_residual(measured, case) -> None:
    for found in measured:
        residual = found[case]
        checked = 2 * (STEPS - 1) if case == "paper" else 2 * STEPS  # "gram" compresses its refresh step too
        assert len(residual["residual"]) == checked
        assert max(residual["residual"]) < 1e-5
        assert max(residual["applied"]) < 1e-5  # applied = mean of (Y − new error) = mean of what was sent
        assert residual["ranks"] == [1] * checked


@pytest.mark.parametrize("case", list(CASES))
def test_the_choices_outside_the_tracked_block_are_counted(measured, case) -> None:
    found = measured[0][case]
    notes, sends = found["notes"], (2 * (STEPS - 1) if case == "paper" else 2 * STEPS)
    assert notes["matrices_sent"] == sends  # the paper's refresh step sends its matrices whole
    assert notes["off_block_directions"] == sum(found["off_block"])
    if case == "block":
        assert sum(found["off_block"]) == 0
    if case == "energy":  # on this data the defaults do leave the block, so "block" is no empty check
        assert sum(found["off_block"]) > 0


@pytest.mark.parametrize("case", list(CASES))
def test_every_worker_holds_the_same_basis_and_choice(measured, case) -> None:
    # The coefficients of the workers are summed, so they must be in one basis, chosen the same way.
    assert all(measured[0][case]["same"]) and len(measured[0][case]["same"]) == STEPS


# Compressed step: k energies per matrix (4 + 5), the biases (4 + 5), r·max(n, m) coefficients (18 + 64); the
# default also moves each basis one power step at a time (k·r numbers: 4 + 5).
COMPRESSED = 4 * (9 + 9 + 18 + 64)
TRACK = 4 * (4 + 5)
# A "gram" refresh step: the upper triangles of the 4 × 4 and 5 × 5 Gram matrices (10 + 15) instead of the
# energies, the biases and the coefficients; the paper's refresh sends the whole bucket.
GRAM = 4 * (10 + 15 + 9 + 18 + 64)


def test_greedylore_bytes(measured) -> None:
    for case in ("energy", "probe"):
        assert measured[0][case]["bytes"] == [GRAM] + [COMPRESSED + TRACK] * (STEPS - 1)
    assert measured[0]["paper"]["bytes"] == [4 * NUMEL] + [COMPRESSED] * (STEPS - 1)


def test_a_stale_basis_is_refreshed(measured) -> None:
    gram, mean = measured[0]["stale"]["gram"], measured[0]["stale"]["mean"]
    assert gram["steps"] == [GRAM] + [TRACK + 4 * (9 + 10 + 15 + 9 + 18 + 64)] * (STEPS - 1)  # then Gram
    assert gram["summary"]["basis_refreshes"] == 2 * STEPS
    assert mean["steps"] == [4 * NUMEL, COMPRESSED, 4 * NUMEL, COMPRESSED]
    assert mean["summary"]["basis_refreshes"] == 2 * 2  # two matrices, refreshed at steps 0 and 2


def test_a_turning_gradient_is_followed_at_once(measured) -> None:
    # The paper's basis is rebuilt every 100 steps only: after the turn, rank 1 of it sends a fraction of the
    # gradient and the rest piles up in the residual. The default's power step turns its top direction to the
    # new one at the step of the turn (orth(mean Y C̄ᵀ) with C̄ along v), with no refresh.
    rotating = measured[0]["rotating"]
    assert min(rotating["energy"]) > 0.9, rotating
    assert min(rotating["paper"][1:TURN]) > 0.9  # before the turn, both track the gradient
    after = rotating["paper"][TURN:]
    assert sum(after) / len(after) < 0.6, rotating
    fixed = rotating["fixed"][TURN:]  # without the power step (and no early refresh) the default fails too
    assert sum(fixed) / len(fixed) < 0.6, rotating


def test_all_reduce_and_powersgd_bytes(measured) -> None:
    meters = measured[0]["meters"]
    assert meters["none"] == {"steps": [4 * NUMEL] * STEPS, "counted": STEPS}
    # Two vanilla steps, then P and Q: (n + m) · r per matrix, (4 + 18) + (5 + 64), plus the 9 biases.
    powersgd = [4 * NUMEL] * gradcomp.POWERSGD_START + [4 * (22 + 69 + 9)] * (STEPS - gradcomp.POWERSGD_START)
    assert meters["powersgd"] == {"steps": powersgd, "counted": STEPS}


def test_full_basis_is_orthonormal_and_lifts_back() -> None:
    y = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    basis, energy = gradcomp.full_basis(y)
    torch.testing.assert_close(basis.T @ basis, torch.eye(5), atol=1e-5, rtol=0)
    every = torch.arange(5)
    torch.testing.assert_close(gradcomp.lift(basis, every, basis.T @ y), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(energy, (basis.T @ y).square().sum(dim=1), atol=1e-4, rtol=1e-5)
    assert gradcomp.oriented(torch.zeros(7, 3)).shape == (3, 7)


def test_gram_basis_spans_the_sum_of_the_local_energies() -> None:
    # Two workers' matrices: the top-r eigenvectors of Σ Y_i Y_iᵀ leave the least summed residual, and the
    # eigenvalues are each direction's summed energy.
    generator = torch.Generator().manual_seed(0)
    ys = [torch.randn(5, 9, generator=generator) for _ in range(2)]
    basis, energy = gradcomp.gram_basis(sum(y @ y.T for y in ys))
    torch.testing.assert_close(basis.T @ basis, torch.eye(5), atol=1e-5, rtol=0)
    summed = sum((basis.T @ y).square().sum(dim=1) for y in ys)
    torch.testing.assert_close(energy, summed, atol=1e-4, rtol=1e-5)
    assert torch.all(energy[:-1] >= energy[1:])
    residual = sum((y - basis[:, :2] @ basis[:, :2].T @ y).square().sum() for y in ys)
    for seed in range(5):  # no other rank-2 subspace leaves less
        q, _ = torch.linalg.qr(torch.randn(5, 2, generator=torch.Generator().manual_seed(seed)))
        assert residual <= sum((y - q @ q.T @ y).square().sum() for y in ys) + 1e-4


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


def test_the_greedy_choice_takes_the_most_energy_and_says_its_share() -> None:
    from lrdeploy.trainer.greedylore import _top

    chosen, share = _top(torch.tensor([1.0, 4.0, 0.0, 3.0]), 2)
    assert chosen.tolist() == [1, 3] and share == pytest.approx(7 / 8)
    assert _top(torch.zeros(3), 2)[1] == 1.0  # no energy at all (a zero gradient): nothing is lost
    assert sorted(_top(torch.ones(2), 5)[0].tolist()) == [0, 1]  # rank above k: every direction
    chosen, share = _top(torch.tensor([1.0, 4.0, 0.0, 3.0]), 2, greedy=False)  # the top block, whatever
    assert chosen.tolist() == [0, 1] and share == pytest.approx(5 / 8)


@pytest.mark.parametrize("warm_start", ["block", "rows"])
def test_the_power_steps_warm_start_keeps_what_was_sent(warm_start) -> None:
    from lrdeploy.trainer.greedylore import GreedyLoreState, _remember

    state = GreedyLoreState(rank=2, warm_start=warm_start)
    whole = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # coefficients of directions 1 and 0, in that order
    _remember(state, 7, torch.tensor([1, 0]), whole)
    first = [[2.0, 2.0], [1.0, 1.0]] if warm_start == "rows" else whole.tolist()  # rows: row j = direction j
    assert state.applied[7].tolist() == first
    _remember(state, 7, torch.tensor([3, 0]), torch.tensor([[9.0, 9.0], [5.0, 5.0]]))  # part of the block
    assert state.applied[7].tolist() == ([[5.0, 5.0], [1.0, 1.0]] if warm_start == "rows" else first)
    with pytest.raises(ValueError, match="warm start"):
        GreedyLoreState(rank=2, warm_start="both")
