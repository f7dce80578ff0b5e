"""``train_and_export``: train, export to ONNX, check it on onnxruntime, and write the model card.

from lrdeploy.trainer import TrainConfig, LRPETConfig, train_and_export
result = train_and_export(TrainConfig(arch="lenet5", method=LRPETConfig(rank_ratio=0.25)), "lenet.onnx")
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from lrdeploy.errors import RuntimeFailure
from lrdeploy.trainer.card import write_card
from lrdeploy.trainer.config import TrainConfig
from lrdeploy.trainer.export import INPUT_NAME, onnx_accuracy, save_onnx, to_onnx
from lrdeploy.trainer.files import check_targets, default_checkpoint, ranks_path, write_text_atomic
from lrdeploy.trainer.loop import TrainResult, train
from lrdeploy.trainer.progress import Reporter

__all__ = ["Exported", "default_checkpoint", "train_and_export"]


@dataclass
class Exported:
    result: TrainResult
    onnx: Path | None  # None on ranks other than 0
    onnx_accuracy: float | None = None
    card: dict | None = None
    files: tuple[Path, ...] = ()


def _inputs(config: TrainConfig) -> dict[str, Path]:
    """The files the run reads, which no output may replace."""
    data = Path(config.data)
    return {"--data": data} if config.data != "mnist" and data.is_file() else {}


def train_and_export(
    config: TrainConfig,
    output: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> Exported:
    """Train as ``config`` says and write ``output`` (ONNX), its cards and, for LRPET, ``*.ranks.json``.

    Accuracy on onnxruntime must match PyTorch's to within one test image (ties in the logits), else
    `RuntimeFailure`: an export that changed the function is a bug, not a result. The paths are checked
    before training (`check_targets`), and nothing is written unless that check passed.
    """
    output, checkpoint = check_targets(output, checkpoint, _inputs(config))
    result = train(config, checkpoint=checkpoint, resume=resume, reporter=reporter)
    if not result.main:
        return Exported(result, None)
    metadata = {"lrdeploy.train.method": config.method.name, "lrdeploy.train.arch": config.arch}
    proto = to_onnx(result.model, result.spec.shape, metadata)
    data = result.dataset
    accuracy = onnx_accuracy(proto.SerializeToString(), data.x_test, data.y_test)
    if abs(accuracy - result.test_accuracy) * len(data.y_test) > 1.0 + 1e-9:
        raise RuntimeFailure(
            f"the exported model scores {accuracy:.2%} on onnxruntime "
            f"but {result.test_accuracy:.2%} in PyTorch"
        )
    card = {
        "model": output.name,
        "config": config.to_dict(),
        "method_summary": result.method_summary,
        "data": {
            "name": data.name,
            "source": data.source,
            "train": len(data.y_train),
            "test": len(data.y_test),
            "classes": data.classes,
            "input_mean": list(result.spec.mean),
            "input_std": list(result.spec.std),
        },
        "input": {"name": INPUT_NAME, "shape": ["batch", *result.spec.shape]},
        "test_accuracy": {"torch": result.test_accuracy, "onnxruntime": accuracy},
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "opset": proto.opset_import[0].version,
        "history": result.history,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": result.device,
            "world_size": result.world_size,
            "seconds": round(result.seconds, 1),
        },
    }
    save_onnx(proto, output)
    files = [output, *write_card(card, output)]
    ranks = result.method_summary.get("ranks")
    if ranks:
        write_text_atomic(ranks_path(output), json.dumps(ranks, indent=2) + "\n")
        files.append(ranks_path(output))
    return Exported(result, output, accuracy, card, tuple(files))
