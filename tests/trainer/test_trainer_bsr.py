"""BSR: the modified stable rank's value and gradient, the penalty on BN-folded weights, training, the CLI."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from lrdeploy.errors import UsageError  # noqa: E402
from lrdeploy.trainer.__main__ import main  # noqa: E402
from lrdeploy.trainer.bsr import (  # noqa: E402
    BSRConfig,
    SubspaceTracker,
    modified_stable_rank,
    penalty,
    stable_ranks,
)
from lrdeploy.trainer.config import TrainConfig  # noqa: E402
from lrdeploy.trainer.loop import train  # noqa: E402
from lrdeploy.trainer.lrpet import batchnorm_pairs  # noqa: E402
from lrdeploy.trainer.methods import BSRHooks, hooks_for, method_from_dict  # noqa: E402


def _matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * sigma[:rank]) @ vh[:rank]


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), k=st.integers(1, 12), seed=st.integers(0, 99))
def test_value_is_the_dropped_energy_over_the_kept_energy(m: int, n: int, k: int, seed: int) -> None:
    matrix = _matrix(m, n, seed)
    kept = _best_rank(matrix, k).square().sum()
    expected = (matrix.square().sum() - kept) / kept  # ‖W‖_F² / ‖W_k‖_F² − 1
    assert modified_stable_rank(matrix, k).item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
    # scale-invariant: weight decay and the penalty do not fight over the size of W
    assert modified_stable_rank(3.7 * matrix, k).item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)


def test_zero_exactly_at_rank_k_and_positive_above() -> None:
    low = _matrix(10, 3, 1) @ _matrix(3, 8, 2)  # rank 3
    assert modified_stable_rank(low, 3).item() == pytest.approx(0.0, abs=1e-12)
    assert modified_stable_rank(low, 2).item() > 1e-3


def test_gradient_matches_the_closed_form_and_finite_differences() -> None:
    matrix = _matrix(7, 5, 3).requires_grad_()
    rank = 2
    value = modified_stable_rank(matrix, rank)
    (grad,) = torch.autograd.grad(value, matrix)
    w = matrix.detach()
    frob, kept = w.square().sum(), _best_rank(w, rank).square().sum()
    closed = 2 * w / kept - 2 * frob * _best_rank(w, rank) / kept**2
    torch.testing.assert_close(grad, closed, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: modified_stable_rank(x, rank), (matrix,))


@pytest.mark.parametrize("refresh_every", [0, 50])
def test_the_warm_started_penalty_tracks_the_exact_value_along_a_training_run(refresh_every: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
    plan, tracker = {"1": 16, "3": 11}, SubspaceTracker(refresh_every=refresh_every)
    x, target = torch.randn(64, 400), torch.randn(64, 84)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    worst, values = 0.0, []
    for _ in range(120):  # the penalty pulls the spectra apart while the data term moves the subspaces
        tracked = penalty(model, plan, {}, 1.0, tracker)
        with torch.no_grad():
            exact = penalty(model, plan, {}, 1.0)
        worst = max(worst, abs(tracked.item() - exact.item()) / exact.item())
        values.append(exact.item())
        loss = nn.functional.mse_loss(model(x), target) + tracked
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert worst < 1e-3
    assert values[-1] < 0.2 * values[0]  # the weights (and their subspaces) did move
    basis = tracker.bases["1"]
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5, rtol=0)


def test_a_stale_subspace_overestimates_and_one_tracker_step_moves_it_back() -> None:
    matrix = _matrix(30, 50, 4).float()
    tracker = SubspaceTracker(refresh_every=0)
    exact = modified_stable_rank(matrix, 5).item()
    cold = modified_stable_rank(matrix, 5, tracker.top("w", matrix, 5)).item()  # first call: exact
    assert cold == pytest.approx(exact, rel=1e-5)
    rotated = matrix + 0.3 * _matrix(30, 50, 5).float()  # a large step: the old block is off
    stale = modified_stable_rank(rotated, 5, tracker.bases["w"][:, :5]).item()
    moved = modified_stable_rank(rotated, 5, tracker.top("w", rotated, 5)).item()
    truth = modified_stable_rank(rotated, 5).item()
    assert stale > moved >= truth * (1 - 1e-5)  # the value is a maximum over subspaces: never below


def _conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
    model[1].weight.data.uniform_(0.2, 3.0)
    model[1].running_var.uniform_(0.01, 4.0)
    return model


def test_a_conv_before_batchnorm_is_regularized_as_the_folded_operator() -> None:
    model = _conv_bn()
    conv, bn = model[0], model[1]
    pairs = batchnorm_pairs(model)
    assert set(pairs) == {"0"}
    d = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()[:, None]
    folded = d * conv.weight.reshape(8, -1)
    got = penalty(model, {"0": 2}, pairs, 0.5)
    assert got.item() == pytest.approx(0.5 * modified_stable_rank(folded, 2).item(), rel=1e-5)
    plain = penalty(model, {"0": 2}, {}, 0.5)
    assert plain.item() != pytest.approx(got.item(), rel=1e-3)  # the fold changes the value
    got.backward()
    assert conv.weight.grad is not None and bn.weight.grad is None  # d is detached


def test_config_validates_and_round_trips() -> None:
    config = BSRConfig(rank_ratio=0.3, strength=0.1, exclude=("fc3",))
    assert method_from_dict(config.to_dict()) == config
    restored = TrainConfig.from_dict(TrainConfig(method=config).to_dict())
    assert restored.method == config
    assert isinstance(hooks_for(config), BSRHooks)
    with pytest.raises(UsageError, match="rank ratio must be in"):
        BSRConfig(rank_ratio=0.0)
    with pytest.raises(UsageError, match="--strength must be ≥ 0"):
        BSRConfig(strength=-1.0)


def _final_msr(strength: float) -> dict[str, float]:
    config = TrainConfig(arch="mlp", method=BSRConfig(0.25, strength), epochs=2, subset=512, batch_size=64)
    return train(config).method_summary["modified_stable_rank"]


def test_training_with_the_penalty_lowers_the_modified_stable_rank() -> None:
    regularized, control = _final_msr(5.0), _final_msr(0.0)
    for layer in ("fc1", "fc2"):
        assert regularized["final"][layer] < regularized["initial"][layer]
        assert regularized["final"][layer] < 0.5 * control["final"][layer]


def test_stable_ranks_reports_every_planned_layer() -> None:
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    plan = BSRConfig(rank_ratio=0.2).plan(model)
    assert set(stable_ranks(model, plan, {})) == set(plan) == {"0", "2"}


def test_cli_trains_bsr_and_the_card_says_to_compress_with_a_budget(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--method", "bsr", "--arch", "mlp", "--rank-ratio", "0.3", "--strength", "0.2"]
    assert main([*argv, "--subset", "64", "--epochs", "1", "--no-progress", "-o", "m.onnx"]) == 0
    card = json.loads((tmp_path / "m.card.json").read_text())
    assert card["config"]["method"] == {
        "method": "bsr",
        "rank_ratio": 0.3,
        "strength": 0.2,
        "include": [],
        "exclude": [],
    }
    assert set(card["method_summary"]["modified_stable_rank"]["final"]) == {"fc1", "fc2", "fc3"}
    assert "--target-params 0.25 --calib mnist" in (tmp_path / "m.card.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "lrpet", "--rank-ratio", "0.2", "--strength", "1"], "--strength applies to"),
        (["--method", "bsr", "--strength", "-1"], "--strength must be ≥ 0"),
        (["--method", "bsr", "--rank-ratio", "2"], "rank ratio must be in (0, 1]"),
        (["--method", "bsr", "--factor", "3"], "--factor applies to --method lorita"),
        (["--method", "bsr", "--project-every", "3"], "--project-every applies to --method lrpet only"),
    ],
)
def test_bad_bsr_flags_are_one_line_usage_errors(argv, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--subset", "16", "--epochs", "1", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []
