"""The training loop: SGD with momentum, a cosine schedule (after an optional linear warm-up), the method's
hooks, checkpoints, DDP.

One process (CPU by default, CUDA when available):
    lrdeploy train --method lrpet --arch lenet5 --rank-ratio 0.25 -o lenet_lrpet.onnx
Data parallel on 4 GPUs, or on 2 nodes (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE for each process):
    torchrun --nproc_per_node=4 -m lrdeploy.trainer --method lrpet --arch resnet20 --rank-ratio 0.25 -o r.onnx
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \\
        -m lrdeploy.trainer ...        (and --node_rank=1 on the second node)
Compressed gradient traffic between the processes (docs/gradient-compression.md):
    torchrun --nproc_per_node=2 -m lrdeploy.trainer --grad-compress greedylore --grad-rank 2 -o l.onnx
Interrupted? The same command with --resume continues from the last checkpoint (saved every epoch).

Every process sees 1/world_size of each epoch (DistributedSampler, reshuffled per epoch from the seed, so a
resumed run sees the same batches as an uninterrupted one); gradients are averaged by DDP, through the
communication hook of --grad-compress, which also counts the bytes. Only rank 0 evaluates, prints and writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from lrdeploy.errors import RuntimeFailure, UsageError
from lrdeploy.trainer import gradcomp
from lrdeploy.trainer.archs import InputSpec, build
from lrdeploy.trainer.config import TrainConfig
from lrdeploy.trainer.data import Dataset, load_dataset
from lrdeploy.trainer.distributed import Context, all_reduce, setup, teardown
from lrdeploy.trainer.files import checkpoint_target, load_checkpoint, write_atomic
from lrdeploy.trainer.finetune_optim import make_optimizer, warmup_steps
from lrdeploy.trainer.methods import hooks_for
from lrdeploy.trainer.progress import Reporter, SilentReporter

__all__ = ["TrainResult", "evaluate", "recalibrate_batchnorm", "train"]

CHECKPOINT_VERSION = 1
CALIBRATION_SAMPLES = 2048
_CHECKPOINT_KEYS = {"version", "config", "epoch", "model", "optimizer", "schedule", "history"}


@dataclass
class TrainResult:
    """The trained model (collapsed or projected, on CPU, in eval mode) and what the card reports."""

    model: nn.Module
    config: TrainConfig
    dataset: Dataset
    spec: InputSpec
    test_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)
    method_summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    world_size: int = 1
    device: str = "cpu"
    main: bool = True  # False on ranks other than 0, which must not write anything


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on images ``x`` and labels ``y``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(y))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Re-estimate every BatchNorm's running mean and variance on images ``x`` (cumulative average).

    A projection moves the weights at once, while the running statistics still describe the weights
    before it; in eval mode the stale statistics can cost most of the accuracy (measured: a VGG projected
    after its first epoch scored 12% on test with them, while training accuracy was 75%).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: every sample weighs the same
    model.train()
    device = next(model.parameters()).device
    for start in range(0, len(x), batch_size):
        model(x[start : start + batch_size].to(device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(was_training)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _save(state: dict, path: Path) -> None:
    write_atomic(path, lambda temporary: torch.save(state, temporary))


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents; a file that is not one is a one-line usage error, not a pickle traceback."""
    not_ours = f"--resume: {path} is not an lrdeploy checkpoint; give one that lrdeploy train saved"
    state = load_checkpoint(path, not_ours)
    if not _CHECKPOINT_KEYS.issubset(state):
        raise UsageError(not_ours)
    if state["version"] != CHECKPOINT_VERSION:
        raise UsageError(
            f"{not_ours} (version {state['version']!r}, this trainer writes {CHECKPOINT_VERSION})"
        )
    return state


def _load_checkpoint(path: Path, config: TrainConfig) -> dict:
    state = _read_checkpoint(path)
    try:
        saved = TrainConfig.from_dict(state["config"])
    except (TypeError, KeyError, AttributeError) as error:
        raise UsageError(f"--resume: {path} holds no readable training config") from error
    mismatch = config.resume_mismatch(saved)
    if mismatch:
        raise UsageError(f"--resume: {path} was trained with other settings ({mismatch})")
    return state


def train(
    config: TrainConfig,
    *,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> TrainResult:
    """Train as ``config`` says; with ``checkpoint``, save one every epoch (rank 0) and maybe resume."""
    reporter = reporter or SilentReporter()
    checkpoint = checkpoint_target(checkpoint) if checkpoint is not None else None
    if resume and checkpoint is None:
        raise UsageError("--resume needs a checkpoint")
    state = _load_checkpoint(checkpoint, config) if resume else None  # refused before any data is read
    context = setup(config.device)
    try:
        if config.grad_compress != "none" and not context.distributed:
            raise UsageError(
                f"--grad-compress {config.grad_compress} compresses data-parallel gradients: "
                "launch with torchrun --nproc-per-node N (N ≥ 2), or drop the option"
            )
        return _train(config, context, checkpoint, state, reporter if context.main else SilentReporter())
    finally:
        teardown(context)


def _train(
    config: TrainConfig, context: Context, checkpoint: Path | None, state: dict | None, reporter: Reporter
) -> TrainResult:
    started = time.perf_counter()
    device = context.device
    # -- data: in memory; every process reads its own shard of each epoch ---------------------------------
    dataset = load_dataset(config.data).subset(config.subset)
    mean, std = dataset.channel_stats()
    spec = InputSpec(*dataset.shape, dataset.classes, mean, std)
    x_train, y_train = torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train)
    x_test, y_test = torch.from_numpy(dataset.x_test), torch.from_numpy(dataset.y_test)
    sampler = DistributedSampler(
        TensorDataset(y_train), context.world_size, context.rank, shuffle=True, seed=config.seed
    )
    batches = BatchSampler(sampler, config.batch_size, drop_last=False)
    # TensorDataset indexed by a whole batch of indices at once: no per-sample Python overhead.
    loader = DataLoader(TensorDataset(x_train, y_train), sampler=batches, batch_size=None)
    # A fixed sample of training images to re-estimate BatchNorm statistics after projections.
    picks = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(config.seed))
    calibration = x_train[picks[:CALIBRATION_SAMPLES]]

    # -- model: built from the seed, then the method changes it (LoRITa's compositions) -------------------
    _seed_everything(config.seed)
    model = build(config.arch, spec)
    sync = _broadcaster() if context.distributed else None
    hooks = hooks_for(config.method, sync)
    hooks.prepare(model)
    model.to(device)
    optimizer, schedule = make_optimizer(
        model.parameters(),
        "sgd",
        config.resolved_lr,
        config.momentum,
        config.resolved_weight_decay,
        config.epochs * len(loader),
        warmup_steps(config.warmup, len(loader)),
    )

    # -- resume: weights, optimizer and schedule from the checkpoint; data order follows from the epoch ---
    first_epoch, history = 1, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        first_epoch, history = state["epoch"] + 1, list(state["history"])
        reporter.message(f"resumed from {checkpoint} after epoch {state['epoch']}")
    trained, traffic = model, None
    if context.distributed:
        ids = [context.local_rank] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        grad_rank = config.resolved_grad_rank
        traffic = gradcomp.register(trained, config.grad_compress, grad_rank, config.seed)

    # -- the loop --------------------------------------------------------------------------------------
    step = (first_epoch - 1) * len(loader)
    loss_fn = nn.CrossEntropyLoss()
    reporter.start(first_epoch, config.epochs, len(loader))
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            epoch_start = time.perf_counter()
            sampler.set_epoch(epoch)
            trained.train()
            totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
            for done, (x, y) in enumerate(loader, 1):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = trained(x)
                loss = loss_fn(logits, y)
                extra = hooks.penalty(model)  # BSR's stable-rank term; the reported loss includes it
                if extra is not None:
                    loss = loss + extra
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                hooks.after_step(model, step)
                value = loss.item()
                if not math.isfinite(value):
                    raise RuntimeFailure(
                        f"training diverged (loss {value} in epoch {epoch}, step {step}); try a lower --lr"
                    )
                totals += torch.tensor([value * len(y), (logits.argmax(1) == y).sum().item(), len(y)])
                reporter.batch(done, totals[0].item() / totals[2].item(), totals[1].item() / totals[2].item())
            hooks.after_epoch(model, epoch)
            if hooks.moves_weights:
                recalibrate_batchnorm(model, calibration)
            totals = all_reduce(totals, context)
            train_loss, train_acc = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
            # Evaluated after the epoch's projection, so LRPET's numbers are those of a rank-r model.
            test_acc = evaluate(model, x_test, y_test) if context.main else float("nan")
            seconds = time.perf_counter() - epoch_start
            history.append(
                {"epoch": epoch, "loss": train_loss, "train_accuracy": train_acc, "test_accuracy": test_acc}
            )
            reporter.epoch(epoch, train_loss, train_acc, test_acc, seconds)
            if epoch == first_epoch and hooks.first_epoch_note and context.main:
                reporter.message(hooks.first_epoch_note)
            if checkpoint is not None and context.main:
                _save(
                    {
                        "version": CHECKPOINT_VERSION,
                        "config": config.to_dict(),
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "history": history,
                    },
                    checkpoint,
                )
    finally:
        reporter.close()

    # -- finish: the last projection (LRPET) or the collapse (LoRITa), on the CPU ---------------------------
    model = hooks.finish(model)
    if hooks.moves_weights:
        recalibrate_batchnorm(model, calibration)
    model = model.cpu().eval()
    test_acc = evaluate(model, x_test, y_test)
    return TrainResult(
        model=model,
        config=config,
        dataset=dataset,
        spec=spec,
        test_accuracy=test_acc,
        history=history,
        method_summary={**hooks.summary, **({"gradient_traffic": traffic.summary()} if traffic else {})},
        seconds=time.perf_counter() - started,
        world_size=context.world_size,
        device=str(device),
        main=context.main,
    )


def _broadcaster():
    import torch.distributed as dist

    def sync(tensors) -> None:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)

    return sync
