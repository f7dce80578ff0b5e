"""``lrdeploy finetune``: flags become a `FinetuneConfig`, `finetune` does the work, rich shows progress.

Like ``lrdeploy train``'s module, this one imports only the standard library, typer and lrdeploy's light
option types, so the compressor's CLI registers the command without importing torch or onnx2torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lrdeploy.cli.options import MaxRelL2, MinCosine, MinTop1, ModelArg

__all__ = ["finetune"]


def finetune(
    compressed: ModelArg,
    teacher: Annotated[
        Path,
        typer.Option(help="The original (uncompressed) model: its outputs on onnxruntime are the targets."),
    ],
    data: Annotated[
        str, typer.Option(help="'mnist' (bundled), an .npz with x/y arrays, or an image folder.")
    ] = "mnist",
    output: Annotated[  # str: Path drops the trailing '/' of "-o dir/", which must be refused
        str | None, typer.Option("-o", "--output", help="ONNX to write (default: COMPRESSED_ft.onnx).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Batch size per process.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate, cosine to 0.")] = 0.01,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 0.0,
    optimizer: Annotated[
        str, typer.Option(help="sgd, or adam (BN-folded deep nets: see docs/finetune.md).")
    ] = "sgd",
    warmup: Annotated[
        float, typer.Option(help="Epochs of linear lr warm-up before the cosine (fractions allowed).")
    ] = 0.0,
    temperature: Annotated[float, typer.Option(help="Distillation temperature T (KL on logits / T).")] = 3.0,
    alpha: Annotated[
        float, typer.Option(help="Weight of cross-entropy on the labels; 1 - alpha weighs distillation.")
    ] = 0.5,
    loss: Annotated[
        str, typer.Option(help="auto (KL for [N, classes] outputs, else MSE), kl or mse.")
    ] = "auto",
    augment: Annotated[
        bool,
        typer.Option(
            help="Shift every training image by up to ±2 pixels at random (zero fill); the teacher sees "
            "the same images. For [N, C, H, W] inputs."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the data order and of --augment's shifts.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    subset: Annotated[
        int | None, typer.Option(help="Use only the first N train and test samples (quick runs).")
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="Checkpoint saved every epoch (default: OUTPUT.ckpt.pt).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint (same flags).")] = False,
    verify: Annotated[bool, typer.Option(help="Compare the output with the teacher on onnxruntime.")] = True,
    max_rel_l2: MaxRelL2 = None,
    min_cosine: MinCosine = None,
    min_top1: MinTop1 = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars and per-epoch lines.")] = True,
) -> None:
    """Recover a compressed model's accuracy by distillation from its original; same graph, new values."""
    from lrdeploy.errors import UsageError

    try:
        import torch  # noqa: F401
    except ImportError as error:
        raise UsageError("lrdeploy finetune needs PyTorch: pip install 'lrdeploy[train]'") from error

    from lrdeploy.runtime.verification import VerifyConfig
    from lrdeploy.runtime.verify import Gates
    from lrdeploy.trainer.files import default_checkpoint
    from lrdeploy.trainer.finetune import FinetuneConfig, default_output
    from lrdeploy.trainer.finetune import finetune as run
    from lrdeploy.trainer.progress import RichReporter, SilentReporter

    gates = Gates(max_rel_l2=max_rel_l2, min_cosine=min_cosine, min_top1=min_top1)
    config = FinetuneConfig(
        data=data,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        optimizer=optimizer,
        warmup=warmup,
        temperature=temperature,
        alpha=alpha,
        loss=loss,
        augment=augment,
        seed=seed,
        device=device,
        subset=subset,
        verify=verify,
        verification=VerifyConfig(device="cpu" if device == "cpu" else "auto", seed=seed, gates=gates),
    )
    if output is None:
        output = str(default_output(compressed))
    elif not output or output.endswith("/"):
        raise UsageError(f"-o/--output {output!r} names no file; give a file name")
    if checkpoint is None:
        checkpoint = str(default_checkpoint(Path(output)))
    reporter = RichReporter() if progress else SilentReporter()
    result = run(
        compressed,
        teacher,
        config=config,
        output=output,
        checkpoint=checkpoint,
        resume=resume,
        reporter=reporter,
    )
    if result.model is None:  # a torchrun worker other than rank 0
        return
    from rich.console import Console

    console = Console()
    console.print(
        f"test accuracy on onnxruntime: {result.accuracy_before:.2%} compressed → "
        f"{result.accuracy_after:.2%} fine-tuned (teacher {result.teacher_accuracy:.2%}); distillation loss "
        f"{result.distill_before:.4g} → {result.distill_after:.4g}; {len(result.trained)} initializers "
        f"trained in {result.seconds:.0f} s",
        highlight=False,
    )
    if result.frozen:
        name, why = next(iter(result.frozen.items()))
        more = f" (+{len(result.frozen) - 1} more)" if len(result.frozen) > 1 else ""
        console.print(f"not trained: {name}: {why}{more}", highlight=False)
    if result.verification is not None:
        v = result.verification
        console.print(f"vs teacher ({v.data}): rel L2 {v.rel_l2:.3g}, cosine {v.cosine:.6f}", highlight=False)
    console.print(f"wrote {result.output}", highlight=False)
    console.print(f"checkpoint: {checkpoint}", highlight=False)
