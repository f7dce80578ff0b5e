"""The trainer: LRPET, LoRITa, BSR in PyTorch, writing ONNX that ``lrdeploy compress`` shrinks well.

    from lrdeploy.trainer import TrainConfig, LoRITaConfig, train_and_export
    train_and_export(TrainConfig(arch="lenet5", method=LoRITaConfig(factor=3)), "lenet_lorita.onnx")

Needs PyTorch (``pip install 'lrdeploy[train]'``). Names resolve lazily, so ``lrdeploy.trainer.cli`` imports
without torch and the compressor never pulls it in.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "lrdeploy.trainer.config",
    "BaselineConfig": "lrdeploy.trainer.methods",
    "LRPETConfig": "lrdeploy.trainer.lrpet",
    "LoRITaConfig": "lrdeploy.trainer.lorita",
    "BSRConfig": "lrdeploy.trainer.bsr",
    "lowrank_": "lrdeploy.trainer.methods",
    "project_": "lrdeploy.trainer.lrpet",
    "overparameterize_": "lrdeploy.trainer.lorita",
    "collapse_": "lrdeploy.trainer.lorita",
    "build": "lrdeploy.trainer.archs",
    "load_dataset": "lrdeploy.trainer.data",
    "train": "lrdeploy.trainer.loop",
    "evaluate": "lrdeploy.trainer.loop",
    "export_onnx": "lrdeploy.trainer.export",
    "train_and_export": "lrdeploy.trainer.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lrdeploy.trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
