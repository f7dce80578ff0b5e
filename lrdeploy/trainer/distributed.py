"""Where training runs: one process on CPU or CUDA, or one of many started by ``torchrun``.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/PORT) for each process; we read them, join
the process group (NCCL on CUDA, gloo on CPU) and pin each process to GPU ``LOCAL_RANK``. The same command
runs alone or scaled out; only rank 0 prints, writes checkpoints and exports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lrdeploy.errors import DeviceUnavailable, UsageError

__all__ = ["Context", "all_reduce", "setup", "teardown"]

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Context:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> Context:
    """The context of this process; under torchrun also joins the process group."""
    if device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise DeviceUnavailable("--device cuda: PyTorch sees no CUDA device (or was built without CUDA)")
    use_cuda = cuda and device != "cpu"
    if not _launched_by_torchrun():
        return Context(torch.device("cuda" if use_cuda else "cpu"))
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Context(target, rank, local_rank, world_size)


def teardown(context: Context) -> None:
    if context.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce(values: torch.Tensor, context: Context) -> torch.Tensor:
    """Sum ``values`` over the processes (a CPU tensor back); the tensor itself when not distributed."""
    if not context.distributed:
        return values
    import torch.distributed as dist

    work = values.to(context.device)
    dist.all_reduce(work)
    return work.cpu()
