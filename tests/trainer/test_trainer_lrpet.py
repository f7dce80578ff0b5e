"""LRPET: exact rank after projection, energy transfer, BN rectification, and the compressor's rank rule."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lrdeploy.errors import UsageError  # noqa: E402
from lrdeploy.planning.policy import round_half_up  # noqa: E402
from lrdeploy.trainer.archs import InputSpec, build  # noqa: E402
from lrdeploy.trainer.lrpet import (  # noqa: E402
    BN_DAMPING,
    LRPETConfig,
    batchnorm_pairs,
    check_rank,
    energy_transfer,
    project_,
)

SPEC = InputSpec(1, 28, 28, 10, (0.1307,), (0.3081,))


def _matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("m", "n", "rank"), [(16, 144, 4), (100, 300, 30), (120, 84, 1), (10, 10, 10)])
def test_projection_has_exact_rank(m: int, n: int, rank: int) -> None:
    projected = energy_transfer(_matrix(m, n), rank)
    sigma = torch.linalg.svdvals(projected)
    assert int((sigma > 1e-10 * sigma[0]).sum()) == rank


@pytest.mark.parametrize("keep_pruned", [0.0, 0.3])
def test_energy_transfer_preserves_frobenius_norm(keep_pruned: float) -> None:
    matrix = _matrix(32, 72, seed=1)
    projected = energy_transfer(matrix, 5, keep_pruned)
    assert torch.linalg.matrix_norm(projected).item() == pytest.approx(
        torch.linalg.matrix_norm(matrix).item(), rel=1e-12
    )


def test_energy_transfer_scales_kept_values_and_keeps_c_of_the_rest() -> None:
    matrix = _matrix(20, 30, seed=2)
    sigma = torch.linalg.svdvals(matrix)
    after = torch.linalg.svdvals(energy_transfer(matrix, 6, 0.25))
    alpha = torch.sqrt((sigma.square().sum() - 0.25**2 * sigma[6:].square().sum()) / sigma[:6].square().sum())
    torch.testing.assert_close(after[:6], alpha * sigma[:6])
    torch.testing.assert_close(after[6:], 0.25 * sigma[6:])


def _conv_bn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    bn = model[1]
    bn.weight.data.uniform_(0.2, 3.0)
    bn.running_var.uniform_(0.01, 4.0)
    bn.running_mean.normal_()
    return model


def test_bn_rectification_projects_the_folded_weight() -> None:
    model = _conv_bn()
    conv, bn = model[0], model[1]
    d = (bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).to(torch.float64)[:, None]
    folded_before = d * conv.weight.detach().reshape(16, -1).to(torch.float64)
    project_(model, LRPETConfig(rank_ratio=0.25))  # rank round(0.25·16) = 4
    folded_after = d * conv.weight.detach().reshape(16, -1).to(torch.float64)
    expected = d.square() / (d.square() + BN_DAMPING) * energy_transfer(folded_before, 4)
    torch.testing.assert_close(folded_after, expected, rtol=1e-5, atol=1e-6)


def test_projection_without_rectification_is_not_optimal_for_the_folded_weight() -> None:
    """The negative case: projecting W itself truncates worse in the metric that runs after BN folding."""
    errors = {}
    for rectify in (True, False):
        model = _conv_bn(seed=3)
        conv, bn = model[0], model[1]
        d = (bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).to(torch.float64)[:, None]
        folded = d * conv.weight.detach().reshape(16, -1).to(torch.float64)
        project_(model, LRPETConfig(rank_ratio=0.25, bn_rectify=rectify))
        after = d * conv.weight.detach().reshape(16, -1).to(torch.float64)
        # The error of the best multiple of the result: Eckart–Young's minimum when rectified.
        scale = (folded * after).sum() / after.square().sum()
        errors[rectify] = torch.linalg.matrix_norm(folded - scale * after).item()
    assert errors[True] < errors[False]


def test_final_projection_leaves_exact_ranks_as_the_compressor_computes_them() -> None:
    model = build("vgg", SPEC)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    config = LRPETConfig(rank_ratio=0.3, keep_pruned=0.2)
    plan = project_(model, config, final=True)
    pairs = batchnorm_pairs(model)
    assert check_rank(model, plan, pairs) == plan
    for name, rank in plan.items():
        weight = model.get_submodule(name).weight
        m, n = weight.shape[0], weight[0].numel()
        assert rank == max(1, round_half_up(0.3 * min(m, n)))
        assert rank * (m + n) < m * n


def test_plan_skips_layers_the_compressor_leaves_dense_and_honours_ranks_and_patterns() -> None:
    model = build("lenet5", SPEC)
    # ρ = 0.9: conv2 (16×150) r = 14 → 14·166 < 2400 is factorized; the rest save nothing, e.g.
    # conv1 (6×25) r = 5 → 5·31 ≥ 150 and fc1 (120×400) r = 108 → 108·520 ≥ 48000.
    assert LRPETConfig(rank_ratio=0.9).plan(model) == {"conv2": 14}
    assert LRPETConfig(rank_ratio=0.5, exclude=("fc3", "conv*")).plan(model) == {"fc1": 60, "fc2": 42}
    assert LRPETConfig(ranks={"fc1": 7}).plan(model) == {"fc1": 7}
    assert LRPETConfig(rank_ratio=0.5, ranks={"fc1": 7}).plan(model)["fc1"] == 7
    with pytest.raises(UsageError, match="no Linear/Conv2d layer named 'fc9'"):
        LRPETConfig(ranks={"fc9": 3}).plan(model)


def test_batchnorm_pairs_follow_the_graph() -> None:
    assert set(batchnorm_pairs(build("vgg", SPEC))) == {f"features.{i}" for i in (0, 3, 7, 10, 14, 17)}
    assert len(batchnorm_pairs(build("resnet20", SPEC))) == 19
    assert batchnorm_pairs(build("lenet5", SPEC)) == {}

    class Shared(nn.Module):  # the conv output also feeds the residual: the compressor cannot fold BN
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert batchnorm_pairs(Shared()) == {}


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"rank_ratio": 0.0}, {"rank_ratio": 1.5}, {"ranks": {"fc1": 0}}, {"rank_ratio": 0.2, "every": -1}],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        LRPETConfig(**kwargs)


def test_the_own_loop_example_of_the_training_docs_runs_and_leaves_exact_ranks() -> None:
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    section = text[text.index("### LRPET in your own training loop") :]
    code = section[section.index("```python") + len("```python") : section.index("```\n", 10)]
    namespace: dict = {}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    model, plan = namespace["model"], namespace["plan"]
    assert plan == {"0": 2, "4": 32}
    for name, rank in plan.items():
        weight = dict(model.named_modules())[name].weight.detach()
        folded = weight.reshape(weight.shape[0], -1).double()
        if name == "0":  # BN-rectified: the folded operator is the one of exact rank r
            bn = model[1]
            folded = (bn.weight / (bn.running_var + bn.eps).sqrt()).double()[:, None] * folded
        assert int((torch.linalg.svdvals(folded) > 1e-6 * torch.linalg.svdvals(folded)[0]).sum()) == rank
