"""``lrdeploy finetune``: recover a compressed ONNX model's accuracy by distillation from its original.

The teacher (the original model) runs on onnxruntime, once over the data: its outputs are the targets. The
student is the compressed graph converted to PyTorch by onnx2torch (`lrdeploy.trainer.student`); its
parameters (factors, biases, BN scales where BN was not folded) train on KL divergence at temperature T
against the teacher's logits (MSE for outputs that are not [N, classes]), mixed with cross-entropy on the
labels by ``alpha``. The trained tensors are written back into a copy of the compressed ONNX by
initializer name, so the output has the compressed model's nodes, names, opset and metadata (plus
provenance keys); it is checked, verified against the teacher on onnxruntime, and written atomically.

Data, progress, checkpoints, resume and torchrun DDP are the trainer's (`lrdeploy.trainer.data`,
``progress``, ``files``, ``distributed``). The data is fed as the trainer loads it: float32 [N, C, H, W]
in [0, 1], which is what `lrdeploy train`'s models take; a model that expects other preprocessing needs
data prepared for it. ``augment`` shifts each training batch at random (`lrdeploy.trainer.augment`) and
then runs the teacher on that batch instead of once over the data.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from lrdeploy.errors import RuntimeFailure, UsageError, VerificationFailed
from lrdeploy.io.modelio import files_read, load_model, materialize, save_model
from lrdeploy.io.outputs import OutputSet
from lrdeploy.io.provenance import source_sha256
from lrdeploy.runtime.verification import VerifyConfig, run_verification, runtime_source
from lrdeploy.runtime.verify import Verification
from lrdeploy.trainer.augment import augmented_batch, check_images, epoch_generator
from lrdeploy.trainer.data import Dataset, load_dataset
from lrdeploy.trainer.distributed import DEVICES, Context, all_reduce, setup, teardown
from lrdeploy.trainer.files import checkpoint_target, load_checkpoint, write_atomic
from lrdeploy.trainer.finetune_optim import OPTIMIZERS, make_optimizer, warmup_steps
from lrdeploy.trainer.progress import Reporter, SilentReporter
from lrdeploy.trainer.student import Student, build_student

__all__ = ["FinetuneConfig", "FinetuneResult", "default_output", "finetune"]

CHECKPOINT_KIND = "lrdeploy finetune"
CHECKPOINT_VERSION = 1
LOSSES = ("auto", "kl", "mse")
#: Fields a checkpoint must agree on to resume (the epoch count may grow).
RESUME_KEYS = (
    "data",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "temperature",
    "alpha",
    "loss",
    "seed",
    "optimizer",
    "warmup",
    "augment",
)
#: What a checkpoint saved before a key existed trained with.
_SAVED_BEFORE = {"optimizer": "sgd", "warmup": 0.0, "augment": False}
_TEACHER_BATCH = 256
_NOT_SAVED = ("verification", "verify", "device")  # how a run is checked or placed, not how it trains


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. ``alpha`` weighs the task loss (labels), ``1 - alpha`` the distillation loss."""

    data: str = "mnist"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    warmup: float = 0.0  # epochs of linear lr warm-up before the cosine (fractions allowed)
    temperature: float = 3.0
    alpha: float = 0.5
    loss: str = "auto"
    augment: bool = False  # random ±2-pixel shifts of the training images (teacher and student alike)
    seed: int = 0
    device: str = "auto"
    subset: int | None = None
    verify: bool = True
    verification: VerifyConfig = field(default_factory=VerifyConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise UsageError(f"--weight-decay must be ≥ 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not 0 <= self.warmup <= self.epochs:
            raise UsageError(f"--warmup must be in [0, --epochs] (epochs of warm-up), got {self.warmup}")
        if not self.temperature > 0:
            raise UsageError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"--alpha must be in [0, 1] (weight of the task loss), got {self.alpha}")
        if self.loss not in LOSSES:
            raise UsageError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not isinstance(self.augment, bool):
            raise UsageError(f"augment must be True or False, got {self.augment!r}")
        if self.device not in DEVICES:
            raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.subset is not None and self.subset < 1:
            raise UsageError(f"--subset must be a positive number of samples, got {self.subset}")
        if not isinstance(self.verification, VerifyConfig):
            raise UsageError("verification must be an lrdeploy.VerifyConfig")

    def to_dict(self) -> dict[str, Any]:
        """The training settings (JSON): saved in checkpoints and in the output's metadata (without
        ``augment`` when it is off: then both are what they were before the option existed)."""
        saved = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SAVED}
        if not self.augment:
            del saved["augment"]
        return saved


@dataclass
class FinetuneResult:
    """The fine-tuned model and what the run measured (accuracies on onnxruntime, test split)."""

    model: onnx.ModelProto | None  # None on torchrun ranks other than 0
    output: Path | None
    teacher_accuracy: float = math.nan
    accuracy_before: float = math.nan
    accuracy_after: float = math.nan
    distill_before: float = math.nan  # the distillation loss on the test split, before and after
    distill_after: float = math.nan
    trained: list[str] = field(default_factory=list)  # initializer names written back
    frozen: dict[str, str] = field(default_factory=dict)  # parameter → why it was not trained
    history: list[dict[str, float]] = field(default_factory=list)
    verification: Verification | None = None
    seconds: float = 0.0
    device: str = "cpu"
    world_size: int = 1


# -- teacher and accuracy on onnxruntime ----------------------------------------------------------------


def _session(
    model: onnx.ModelProto,
    path: Path | None,
    device: str,
    label: str,
    spinning: bool = True,
    threads: int | None = None,
):
    """``spinning=False`` for a session run between training steps: idle threads then leave the CPU;
    ``threads`` caps its CPU threads (None: onnxruntime's default, every core)."""
    from lrdeploy.runtime.sessions import make_session, select_device

    with runtime_source(model, path) as source:
        device_ = select_device("cpu" if device == "cpu" else "auto")
        return make_session(source, device_, threads, label=label, spinning=spinning)


def _run_onnx(session, x: np.ndarray) -> list[np.ndarray]:
    """Every output of ``session`` on images ``x``, in batches."""
    name = session.get_inputs()[0].name
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(x), _TEACHER_BATCH):
        parts.append(session.run(None, {name: x[start : start + _TEACHER_BATCH]}))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def _accuracy(outputs: list[np.ndarray], y: np.ndarray) -> float:
    first = outputs[0]
    if first.ndim != 2:
        return math.nan
    return float((first.argmax(1) == y).mean())


# -- the loss ----------------------------------------------------------------------------------------


def _kinds(teacher_outputs: list[np.ndarray], loss: str) -> list[str]:
    """Per output: 'kl' (logits [N, K]) or 'mse'."""
    if loss != "auto":
        if loss == "kl":
            bad = [i for i, o in enumerate(teacher_outputs) if o.ndim != 2 or o.shape[1] < 2]
            if bad:
                raise UsageError(
                    f"--loss kl needs [N, classes] logits; output {bad[0]} is not; use --loss mse"
                )
        return [loss] * len(teacher_outputs)
    return ["kl" if o.ndim == 2 and o.shape[1] > 1 else "mse" for o in teacher_outputs]


def _distill(
    student: list[torch.Tensor], teacher: list[torch.Tensor], kinds: list[str], temperature: float
) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature T, scaled by T² (Hinton et al.), or MSE, summed over outputs."""
    total = torch.zeros((), device=student[0].device)
    for s, t, kind in zip(student, teacher, kinds, strict=True):
        if kind == "kl":
            s_log = F.log_softmax(s.float() / temperature, dim=1)
            t_log = F.log_softmax(t.float() / temperature, dim=1)
            total = total + F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * temperature**2
        else:
            total = total + F.mse_loss(s.float(), t.float())
    return total


@torch.no_grad()
def _evaluate(
    student: Student, x: torch.Tensor, y: torch.Tensor, teacher: list[torch.Tensor], kinds, temperature
) -> tuple[float, float]:
    """(top-1 accuracy of the first output, distillation loss) on a split, in PyTorch."""
    device = next(student.parameters()).device
    correct, loss, batch = 0, 0.0, 1000
    for start in range(0, len(y), batch):
        outs = student(x[start : start + batch].to(device))
        targets = [t[start : start + batch].to(device) for t in teacher]
        loss += float(_distill(outs, targets, kinds, temperature)) * len(outs[0])
        if outs[0].ndim == 2:
            correct += int((outs[0].argmax(1).cpu() == y[start : start + batch]).sum())
    return correct / max(1, len(y)), loss / max(1, len(y))


# -- checkpoints ------------------------------------------------------------------------------------------


def _read_checkpoint(path: Path, config: FinetuneConfig, fingerprint: dict[str, str | None]) -> dict:
    not_ours = (
        f"--resume: {path} is not an lrdeploy finetune checkpoint; give one that lrdeploy finetune saved"
    )
    state = load_checkpoint(path, not_ours)
    if state.get("kind") != CHECKPOINT_KIND:
        raise UsageError(not_ours)
    if state.get("version") != CHECKPOINT_VERSION:
        raise UsageError(
            f"{not_ours} (version {state.get('version')!r}, this one writes {CHECKPOINT_VERSION})"
        )
    for key, value in fingerprint.items():
        if state["fingerprint"].get(key) != value:
            raise UsageError(
                f"--resume: {path} fine-tuned another {key.replace('_', ' ')}; give the same models"
            )
    saved, mine = state["config"], config.to_dict()
    for key in RESUME_KEYS:
        theirs, ours = saved.get(key, _SAVED_BEFORE.get(key)), mine.get(key, _SAVED_BEFORE.get(key))
        if theirs != ours:
            raise UsageError(f"--resume: {path} was fine-tuned with {key} {theirs!r}, this run {ours!r}")
    return state


# -- the API ------------------------------------------------------------------------------------------------


@dataclass
class _Models:
    """The two models, loaded (private copies) with the paths they came from, and their SHA-256."""

    student: onnx.ModelProto
    student_path: Path | None
    teacher: onnx.ModelProto
    teacher_path: Path | None
    fingerprint: dict[str, str | None]


def finetune(
    compressed: str | os.PathLike | onnx.ModelProto,
    teacher: str | os.PathLike | onnx.ModelProto,
    data: str | None = None,
    config: FinetuneConfig | None = None,
    *,
    output: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> FinetuneResult:
    """Fine-tune ``compressed`` against ``teacher`` on ``data`` (overrides ``config.data``); see the module.

    With ``output`` the model is written there atomically and only when it passes the verification gates;
    with ``checkpoint`` the student, optimizer and schedule are saved after every epoch and ``resume``
    continues after the last saved one. Neither input is modified.
    """
    config = config or FinetuneConfig()
    if data is not None:
        config = replace(config, data=data)
    reporter = reporter or SilentReporter()
    with OutputSet() as outputs:
        student_model, student_path = load_model(compressed)
        teacher_model, teacher_path = load_model(teacher)
        fingerprint = {"student model": source_sha256(compressed), "teacher model": source_sha256(teacher)}
        models = _Models(student_model, student_path, teacher_model, teacher_path, fingerprint)
        output_path, checkpoint_path = _check_paths(outputs, models, config, output, checkpoint)
        if resume and checkpoint_path is None:
            raise UsageError("--resume needs a checkpoint")
        state = _read_checkpoint(checkpoint_path, config, fingerprint) if resume else None
        student = build_student(materialize(student_model))  # unsupported ops: refused before any data
        if config.augment:
            check_images(*student.input)
        context = setup(config.device)
        try:
            reporter = reporter if context.main else SilentReporter()
            result, dataset = _run(student, models, config, context, checkpoint_path, state, reporter)
        finally:
            teardown(context)
        if not context.main:
            return result
        return _finish(result, student, models, dataset, config, output_path, outputs)


def _check_paths(
    outputs: OutputSet,
    models: _Models,
    config: FinetuneConfig,
    output: str | os.PathLike | None,
    checkpoint: str | os.PathLike | None,
) -> tuple[Path | None, Path | None]:
    """Output and checkpoint paths, refused before training if unwritable or one of the inputs."""
    outputs.protect(files_read(models.student, models.student_path))
    outputs.protect(files_read(models.teacher, models.teacher_path))
    if Path(config.data).is_file():
        outputs.protect([Path(config.data)])
    output_path = Path(output) if output is not None else None
    outputs.check(output_path, "-o/--output")
    if output_path is not None:
        outputs.check(_data_file(output_path), "-o/--output (its .data file)")
    checkpoint_path = checkpoint_target(checkpoint) if checkpoint is not None else None
    outputs.check(checkpoint_path, "--checkpoint")
    return output_path, checkpoint_path


def _data_file(output: Path) -> Path:
    return output.with_name(output.name + ".data")


def _run(
    student: Student,
    models: _Models,
    config: FinetuneConfig,
    context: Context,
    checkpoint: Path | None,
    state: dict | None,
    reporter: Reporter,
) -> tuple[FinetuneResult, Dataset]:
    started = time.perf_counter()
    device = context.device
    dataset = load_dataset(config.data).subset(config.subset)
    student.check_input(dataset.shape)
    # under torchrun every process runs its own teacher: as many threads as its torch (OMP_NUM_THREADS)
    threads = torch.get_num_threads() if context.distributed else None
    session = _session(
        models.teacher, models.teacher_path, config.device, "the teacher", not config.augment, threads
    )
    # augmented: the teacher runs on every shifted batch; here only on a few images for the outputs' kinds
    fixed = dataset.x_train[:_TEACHER_BATCH] if config.augment else dataset.x_train
    reporter.message(f"teacher outputs on onnxruntime: {len(fixed) + len(dataset.y_test)} images")
    teacher_train = _run_onnx(session, fixed)
    teacher_test = _run_onnx(session, dataset.x_test)
    kinds = _kinds(teacher_train, config.loss)
    _check_task(teacher_train, dataset, config)
    result = FinetuneResult(model=None, output=None, device=str(device), world_size=context.world_size)
    result.teacher_accuracy = _accuracy(teacher_test, dataset.y_test)
    result.trained, result.frozen = sorted(set(student.targets.values())), dict(student.frozen)

    x_train, y_train = torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train)
    x_test, y_test = torch.from_numpy(dataset.x_test), torch.from_numpy(dataset.y_test)
    t_train = [torch.from_numpy(t) for t in teacher_train]
    t_test = [torch.from_numpy(t) for t in teacher_test]
    sampler = DistributedSampler(
        TensorDataset(y_train), context.world_size, context.rank, shuffle=True, seed=config.seed
    )
    batches = BatchSampler(sampler, config.batch_size, drop_last=False)
    stored = [] if config.augment else t_train
    loader = DataLoader(TensorDataset(x_train, y_train, *stored), sampler=batches, batch_size=None)

    torch.manual_seed(config.seed)
    student.to(device)
    _, result.distill_before = _evaluate(student, x_test, y_test, t_test, kinds, config.temperature)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer, schedule = make_optimizer(
        params,
        config.optimizer,
        config.lr,
        config.momentum,
        config.weight_decay,
        config.epochs * len(loader),
        warmup_steps(config.warmup, len(loader)),
    )
    first_epoch, history = 1, []
    if state is not None:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        first_epoch, history = state["epoch"] + 1, list(state["history"])
        reporter.message(f"resumed from {checkpoint} after epoch {state['epoch']}")
    trained: nn.Module = student
    if context.distributed:
        ids = [context.local_rank] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(student, device_ids=ids)

    reporter.start(first_epoch, config.epochs, len(loader))
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            epoch_start = time.perf_counter()
            sampler.set_epoch(epoch)
            shifts = epoch_generator(config.seed, epoch, context.rank) if config.augment else None
            totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
            for done, (x, y, *targets) in enumerate(loader, 1):
                if shifts is not None:
                    x, targets = augmented_batch(x, shifts, partial(_run_onnx, session))
                x, y = x.to(device), y.to(device)
                outs = trained(x)
                loss = _distill(outs, [t.to(device) for t in targets], kinds, config.temperature)
                if config.alpha > 0:
                    loss = (1 - config.alpha) * loss + config.alpha * F.cross_entropy(outs[0], y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                value = loss.item()
                if not math.isfinite(value):
                    raise RuntimeFailure(
                        f"fine-tuning diverged (loss {value} in epoch {epoch}); try a lower --lr"
                    )
                hits = (outs[0].argmax(1) == y).sum().item() if outs[0].ndim == 2 else 0
                totals += torch.tensor([value * len(y), hits, len(y)], dtype=torch.float64)
                reporter.batch(done, totals[0].item() / totals[2].item(), totals[1].item() / totals[2].item())
            totals = all_reduce(totals, context)
            test_acc, test_kd = (
                _evaluate(student, x_test, y_test, t_test, kinds, config.temperature)
                if context.main
                else (math.nan, math.nan)
            )
            loss_avg, acc_avg = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
            history.append(
                {
                    "epoch": epoch,
                    "loss": loss_avg,
                    "train_accuracy": acc_avg,
                    "test_accuracy": test_acc,
                    "test_distill": test_kd,
                }
            )
            reporter.epoch(epoch, loss_avg, acc_avg, test_acc, time.perf_counter() - epoch_start)
            if checkpoint is not None and context.main:
                saved = {
                    "kind": CHECKPOINT_KIND,
                    "version": CHECKPOINT_VERSION,
                    "config": config.to_dict(),
                    "fingerprint": models.fingerprint,
                    "epoch": epoch,
                    "student": student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "history": history,
                }
                write_atomic(checkpoint, lambda temporary, saved=saved: torch.save(saved, temporary))
    finally:
        reporter.close()
    student.cpu().eval()
    _, result.distill_after = _evaluate(student, x_test, y_test, t_test, kinds, config.temperature)
    result.history = history
    result.seconds = time.perf_counter() - started
    return result, dataset


def _check_task(teacher_outputs: list[np.ndarray], dataset: Dataset, config: FinetuneConfig) -> None:
    first = teacher_outputs[0]
    if config.alpha > 0 and not (first.ndim == 2 and first.shape[1] >= dataset.classes):
        raise UsageError(
            f"--alpha {config.alpha} mixes in cross-entropy on the labels, but the model's first output "
            f"{list(first.shape[1:])} is not logits over the data's {dataset.classes} classes; pass --alpha 0"
        )


def _finish(
    result: FinetuneResult,
    student: Student,
    models: _Models,
    dataset: Dataset,
    config: FinetuneConfig,
    output: Path | None,
    outputs: OutputSet,
) -> FinetuneResult:
    """Write the trained tensors back by name, check, verify against the teacher, write atomically."""
    tuned = student.write_back(models.student)
    metadata = {p.key: p.value for p in tuned.metadata_props} | _provenance(models, config)
    del tuned.metadata_props[:]
    for key, value in metadata.items():
        tuned.metadata_props.add(key=key, value=value)
    staged = outputs.stage(output) if output is not None else None
    if staged is not None and save_model(tuned, staged, data_name=_data_file(output).name) is not None:
        outputs.stage(_data_file(output), companion=True)
    try:
        onnx.checker.check_model(str(staged) if staged is not None else tuned, full_check=True)
    except onnx.checker.ValidationError as error:
        first = (str(error).strip().splitlines() or ["invalid model"])[0]
        raise RuntimeFailure(
            f"the fine-tuned model fails onnx.checker ({first}); please report this"
        ) from None
    before = _session(models.student, models.student_path, config.device, "the compressed model")
    result.accuracy_before = _accuracy(_run_onnx(before, dataset.x_test), dataset.y_test)
    after = _session(tuned, staged, config.device, "the fine-tuned model")
    result.accuracy_after = _accuracy(_run_onnx(after, dataset.x_test), dataset.y_test)
    if config.verify:
        result.verification = _verify(models, tuned, staged, dataset, config.verification)
        failures = config.verification.gates.failures(result.verification)
        if failures:
            more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
            written = "; output not written" if output is not None else ""
            raise VerificationFailed(
                f"verification against the teacher failed: {failures[0]}{more}{written}", report=result
            )
    outputs.promote()
    result.model, result.output = tuned, output
    return result


def _verify(
    models: _Models, tuned: onnx.ModelProto, staged: Path | None, dataset: Dataset, config: VerifyConfig
) -> Verification:
    """The output against the teacher on onnxruntime: on the held-out split unless other data is given
    (it says more than random inputs about a model trained to agree on images)."""
    from lrdeploy.runtime.inputs import resolve_shapes

    random = config.data is None or config.data == "random"
    if random:
        config = config.with_(data={models.teacher.graph.input[0].name: dataset.x_test})
    shapes = resolve_shapes(models.teacher, None, strict=False)
    with (
        runtime_source(models.teacher, models.teacher_path) as reference,
        runtime_source(tuned, staged) as candidate,
    ):
        return run_verification(models.teacher, reference, candidate, shapes, config)


def _provenance(models: _Models, config: FinetuneConfig) -> dict[str, str]:
    """Keys beside compress's: ``lrdeploy.config`` still describes the structure, which is unchanged."""
    from lrdeploy import __version__

    entries = {
        "lrdeploy.version": __version__,
        "lrdeploy.finetune.config": json.dumps(config.to_dict(), separators=(",", ":"), sort_keys=True),
    }
    for key, digest in models.fingerprint.items():
        if digest is not None:
            entries[f"lrdeploy.finetune.{key.split()[0]}_sha256"] = digest
    return entries


def default_output(compressed: Path) -> Path:
    """COMPRESSED_ft.onnx beside the input."""
    return compressed.with_name(compressed.stem + "_ft.onnx")
