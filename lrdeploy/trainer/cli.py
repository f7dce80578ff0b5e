"""``lrdeploy train``: flags become a `TrainConfig`, `train_and_export` does the work, rich shows progress.

This module imports only the standard library and typer, so the compressor's CLI can register the command
(``app.command()(train)``) without importing torch; torch is imported when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["train"]

_LRPET_ONLY = ("ranks", "project_every", "keep_pruned")


def _read_ranks(path: Path) -> dict[str, int]:
    from lrdeploy.errors import UsageError

    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise UsageError(f"--ranks: cannot read {path}: {error.strerror}") from error
    except json.JSONDecodeError as error:
        raise UsageError(f"--ranks: {path} is not JSON ({error.msg}, line {error.lineno})") from error
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UsageError(f'--ranks: {path} must hold a JSON object {{"layer name": rank}}')
    return data


def train(
    method: Annotated[str, typer.Option(help="baseline, lrpet, lorita or bsr.")] = "baseline",
    arch: Annotated[str, typer.Option(help="mlp, lenet5, resnet20, vgg, vit or bncnn.")] = "lenet5",
    data: Annotated[
        str, typer.Option(help="'mnist' (bundled), an .npz with x/y arrays, or an image folder.")
    ] = "mnist",
    output: Annotated[  # str, not Path: Path drops the trailing '/' of "-o dir/", which must be refused
        str | None, typer.Option("-o", "--output", help="ONNX to write (default: ARCH_METHOD.onnx).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Batch size per process.")] = 128,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak SGD learning rate, cosine to 0 (default: 0.02 for lorita, else 0.05)."),
    ] = None,
    warmup: Annotated[
        float,
        typer.Option(help="Epochs of linear lr warm-up from 0 before the cosine (fractions allowed)."),
    ] = 0.0,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[
        float | None, typer.Option(help="Weight decay (default: 5e-3 for lorita, else 5e-4).")
    ] = None,
    rank_ratio: Annotated[
        float | None,
        typer.Option(help="lrpet, bsr: rank as a fraction of min(m, n), as in compress (bsr: default 0.25)."),
    ] = None,
    ranks: Annotated[
        Path | None, typer.Option(help='lrpet: JSON {"layer name": rank}; wins over --rank-ratio.')
    ] = None,
    project_every: Annotated[
        int, typer.Option(help="lrpet: project every K steps; 0 = after every epoch.")
    ] = 0,
    keep_pruned: Annotated[
        float,
        typer.Option(help="lrpet: keep this fraction c of the pruned singular values between projections."),
    ] = 0.0,
    bn_rectify: Annotated[bool, typer.Option(help="lrpet: project the BN-folded weight.")] = True,
    strength: Annotated[
        float | None, typer.Option(help="bsr: λ of the modified-stable-rank penalty (default: 1.0).")
    ] = None,
    factor: Annotated[
        int | None, typer.Option(help="lorita: linear maps per layer, N ≥ 2 (default: 3).")
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="Only layers whose module name matches this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Skip layers whose module name matches this glob (repeatable).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialization and data order.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    subset: Annotated[
        int | None, typer.Option(help="Use only the first N train and test samples (quick runs).")
    ] = None,
    grad_compress: Annotated[
        str,
        typer.Option(help="Data-parallel (torchrun) gradient compression: none, powersgd or greedylore."),
    ] = "none",
    grad_rank: Annotated[
        int | None, typer.Option(help="Rank of the compressed gradients (default: 4).")
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="Checkpoint saved every epoch (default: OUTPUT.ckpt.pt).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint (same flags).")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars and per-epoch lines.")] = True,
) -> None:
    """Train for low rank (LRPET, LoRITa, BSR) or plainly, export ONNX with a model card."""
    from lrdeploy.errors import UsageError

    given = {"rank_ratio": rank_ratio, "ranks": ranks, "project_every": project_every or None}
    given["keep_pruned"] = keep_pruned or None
    if method != "lrpet":
        extra = [name for name in _LRPET_ONLY if given[name] is not None]
        if extra:
            raise UsageError(f"--{extra[0].replace('_', '-')} applies to --method lrpet only")
    if method not in ("lrpet", "bsr") and rank_ratio is not None:
        raise UsageError("--rank-ratio applies to --method lrpet or bsr only")
    if method != "bsr" and strength is not None:
        raise UsageError("--strength applies to --method bsr only")
    if method != "lorita" and factor is not None:
        raise UsageError("--factor applies to --method lorita only")
    if method == "baseline" and (include or exclude):
        raise UsageError("--include/--exclude choose the layers of --method lrpet, lorita or bsr")
    try:
        import torch  # noqa: F401
    except ImportError as error:
        raise UsageError("lrdeploy train needs PyTorch: pip install 'lrdeploy[train]'") from error

    from lrdeploy.trainer.api import train_and_export
    from lrdeploy.trainer.bsr import DEFAULT_STRENGTH, BSRConfig
    from lrdeploy.trainer.config import TrainConfig
    from lrdeploy.trainer.files import check_targets, default_checkpoint
    from lrdeploy.trainer.lorita import LoRITaConfig
    from lrdeploy.trainer.lrpet import LRPETConfig
    from lrdeploy.trainer.methods import METHODS, BaselineConfig
    from lrdeploy.trainer.progress import RichReporter, SilentReporter

    selection = {"include": tuple(include or ()), "exclude": tuple(exclude or ())}
    if method == "lrpet":
        method_config = LRPETConfig(
            rank_ratio=rank_ratio,
            ranks=_read_ranks(ranks) if ranks else {},
            every=project_every,
            keep_pruned=keep_pruned,
            bn_rectify=bn_rectify,
            **selection,
        )
    elif method == "lorita":
        method_config = LoRITaConfig(factor=3 if factor is None else factor, **selection)
    elif method == "bsr":
        method_config = BSRConfig(
            rank_ratio=0.25 if rank_ratio is None else rank_ratio,
            strength=DEFAULT_STRENGTH if strength is None else strength,
            **selection,
        )
    elif method == "baseline":
        method_config = BaselineConfig()
    else:
        raise UsageError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    config = TrainConfig(
        arch=arch,
        data=data,
        method=method_config,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        momentum=momentum,
        weight_decay=weight_decay,
        seed=seed,
        device=device,
        subset=subset,
        grad_compress=grad_compress,
        grad_rank=grad_rank,
    )
    output = f"{arch}_{method}.onnx" if output is None else output
    if checkpoint is None:  # derived from a checked -o: Path("dir/") and Path(".") have no usable name
        checkpoint = str(default_checkpoint(check_targets(output)[0]))
    reporter = RichReporter() if progress else SilentReporter()
    done = train_and_export(config, output, checkpoint=checkpoint, resume=resume, reporter=reporter)
    if done.onnx is None:  # a torchrun worker other than rank 0
        return
    from rich.console import Console

    console = Console()
    result = done.result
    console.print(
        f"test accuracy {result.test_accuracy:.2%} (PyTorch), {done.onnx_accuracy:.2%} (onnxruntime); "
        f"trained in {result.seconds:.0f} s on {result.device} × {result.world_size}",
        highlight=False,
    )
    for path in done.files:
        console.print(f"wrote {path}", highlight=False)
    console.print(f"checkpoint: {checkpoint}", highlight=False)
