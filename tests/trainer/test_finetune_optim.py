"""The fine-tuner's and trainer's schedule: without warm-up the plain cosine; with it, a linear rise to the
peak and the cosine of the remaining steps; SGD or Adam."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from lrdeploy.trainer.finetune_optim import make_optimizer, schedule_factor, warmup_steps  # noqa: E402


def _lrs(optimizer, schedule, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return seen


@pytest.mark.parametrize("total", [1, 7, 63])
def test_without_warmup_it_is_the_plain_cosine_sgd(total: int) -> None:
    optimizer, schedule = make_optimizer(
        [torch.nn.Parameter(torch.zeros(2))], "sgd", 0.01, 0.9, 0.0, total, 0
    )
    # lr = base · factor, the factor as the trainer's schedule always computed it: bit for bit the same
    cosine = [0.01 * (0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))) for s in range(total + 2)]
    assert _lrs(optimizer, schedule, total + 2) == cosine
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9


@given(st.integers(1, 400), st.data())
def test_warmup_rises_linearly_to_the_peak_then_decays_to_zero(total: int, data) -> None:
    warmup = data.draw(st.integers(0, total))
    factors = [schedule_factor(step, total, warmup) for step in range(total + 1)]
    assert all(0 <= f <= 1 for f in factors)
    assert factors[:warmup] == [(s + 1) / warmup for s in range(warmup)]
    after = factors[warmup:]
    assert after[0] == 1.0
    assert after[-1] == (1.0 if warmup == total else pytest.approx(0.0, abs=1e-12))
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(after))


def test_the_first_step_of_a_warmup_takes_a_fraction_of_the_peak() -> None:
    optimizer, _ = make_optimizer([torch.nn.Parameter(torch.zeros(2))], "sgd", 0.01, 0.9, 0.0, 100, 20)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 20)


def test_adam_is_adam_with_the_weight_decay_and_without_momentum() -> None:
    optimizer, schedule = make_optimizer([torch.nn.Parameter(torch.zeros(2))], "adam", 1e-3, 0.9, 1e-4, 10)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["weight_decay"] == 1e-4 and optimizer.defaults["betas"] == (0.9, 0.999)
    assert _lrs(optimizer, schedule, 3)[0] == 1e-3


@given(st.floats(0, 50, allow_nan=False), st.integers(1, 500))
def test_a_warmup_asked_for_is_at_least_one_step_and_never_more_than_asked_rounded_up(epochs, steps) -> None:
    taken = warmup_steps(epochs, steps)
    assert taken == 0 if epochs == 0 else 1 <= taken <= max(1, math.ceil(epochs * steps))
    assert warmup_steps(1.0, steps) == steps and warmup_steps(0.01, 32) == 1
