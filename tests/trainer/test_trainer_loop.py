"""One-epoch smoke runs of each method end to end, checkpoints and --resume, and the model card."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from reporters import Interrupt  # noqa: E402

import lrdeploy  # noqa: E402
from lrdeploy.errors import UsageError  # noqa: E402
from lrdeploy.trainer.api import train_and_export  # noqa: E402
from lrdeploy.trainer.bsr import BSRConfig  # noqa: E402
from lrdeploy.trainer.config import TrainConfig  # noqa: E402
from lrdeploy.trainer.lorita import LoRITaConfig  # noqa: E402
from lrdeploy.trainer.lrpet import LRPETConfig  # noqa: E402
from lrdeploy.trainer.methods import BaselineConfig  # noqa: E402
from lrdeploy.trainer.progress import SilentReporter  # noqa: E402

SMALL = {"epochs": 1, "subset": 256, "batch_size": 64}


@pytest.mark.parametrize(
    ("arch", "method"),
    [
        ("lenet5", BaselineConfig()),
        ("vgg", LRPETConfig(rank_ratio=0.25, every=2)),
        ("mlp", LoRITaConfig(factor=2)),
    ],
)
def test_one_epoch_smoke_run_exports_a_checked_model_with_its_card(arch, method, tmp_path) -> None:
    output = tmp_path / f"{arch}.onnx"
    done = train_and_export(TrainConfig(arch=arch, method=method, **SMALL), output)
    assert done.onnx == output and output.is_file()
    assert done.onnx_accuracy == pytest.approx(done.result.test_accuracy, abs=1 / 256)
    card = json.loads((tmp_path / f"{arch}.card.json").read_text())
    assert card["config"]["method"]["method"] == method.name and card["config"]["seed"] == 0
    assert card["test_accuracy"]["onnxruntime"] == done.onnx_accuracy
    assert card["data"]["test"] == 256 and len(card["history"]) == 1
    assert (tmp_path / f"{arch}.card.md").read_text().startswith(f"# {arch}.onnx")
    if isinstance(method, LRPETConfig):
        ranks = json.loads((tmp_path / f"{arch}.ranks.json").read_text())
        assert ranks == card["method_summary"]["measured_ranks"]
        _, report = lrdeploy.compress(output, rank_ratio=0.25, output=tmp_path / "c.onnx")
        assert report.verification.outputs[0].rel_l2 < 1e-4


@pytest.mark.parametrize("method", [LRPETConfig(rank_ratio=0.3), BSRConfig(rank_ratio=0.3)])
def test_resume_continues_exactly_where_the_run_stopped(method, tmp_path) -> None:
    config = TrainConfig(arch="mlp", method=method, epochs=2, subset=256, batch_size=64)
    straight = train_and_export(config, tmp_path / "a.onnx", checkpoint=tmp_path / "a.pt").result
    with pytest.raises(KeyboardInterrupt):
        train_and_export(config, tmp_path / "b.onnx", checkpoint=tmp_path / "b.pt", reporter=Interrupt(1))
    resumed = train_and_export(config, tmp_path / "b.onnx", checkpoint=tmp_path / "b.pt", resume=True).result
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path) -> None:
    config = TrainConfig(arch="mlp", **SMALL)
    train_and_export(config, tmp_path / "m.onnx", checkpoint=tmp_path / "m.pt")
    other = TrainConfig(arch="mlp", method=LoRITaConfig(), **SMALL)
    with pytest.raises(UsageError, match="other settings"):
        train_and_export(other, tmp_path / "m.onnx", checkpoint=tmp_path / "m.pt", resume=True)
    with pytest.raises(UsageError, match="no checkpoint"):
        train_and_export(config, tmp_path / "m.onnx", checkpoint=tmp_path / "none.pt", resume=True)


@pytest.mark.parametrize(("warmup", "last_lr"), [(1.0, 0.05), (0.0, 0.0)])
def test_warmup_ramps_the_lr_up_and_a_resume_must_keep_it(warmup, last_lr, tmp_path) -> None:
    """A one-epoch run that is all warm-up ends at the peak lr; without warm-up the cosine ends at 0."""
    config = TrainConfig(arch="mlp", warmup=warmup, **SMALL)
    train_and_export(config, tmp_path / "w.onnx", checkpoint=tmp_path / "w.pt")
    state = torch.load(tmp_path / "w.pt", map_location="cpu", weights_only=True)
    assert state["schedule"]["_last_lr"] == [pytest.approx(last_lr, abs=1e-12)]
    assert state["config"]["warmup"] == warmup
    other = TrainConfig(arch="mlp", warmup=0.5, **SMALL)
    with pytest.raises(UsageError, match="warmup"):
        train_and_export(other, tmp_path / "w.onnx", checkpoint=tmp_path / "w.pt", resume=True)


def test_config_round_trips_through_json() -> None:
    config = TrainConfig(arch="vgg", method=LRPETConfig(ranks={"fc1": 3}, exclude=("fc2",)), epochs=3)
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict()
    assert again.resolved_lr == 0.05 and TrainConfig(method=LoRITaConfig()).resolved_weight_decay == 5e-3


class _Messages(SilentReporter):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


@pytest.mark.parametrize(
    ("method", "noted"), [(LRPETConfig(rank_ratio=0.25), True), (BaselineConfig(), False)]
)
def test_lrpet_says_once_why_its_early_test_accuracy_is_low(method, noted, tmp_path) -> None:
    reporter = _Messages()
    config = TrainConfig(arch="mlp", method=method, epochs=2, subset=128, batch_size=64)
    train_and_export(config, tmp_path / "m.onnx", reporter=reporter)
    notes = [m for m in reporter.messages if "projected to rank r" in m]
    assert len(notes) == (1 if noted else 0)
