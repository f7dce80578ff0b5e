"""The architectures of ``lrdeploy train --arch``, each sized to the data's channels, image size and classes.

Every model takes float32 images [N, C, H, W] with values in [0, 1] and standardizes them itself (the
training set's per-channel mean and std are buffers of the model), so the exported ONNX needs no
preprocessing beyond ``pixels / 255``. Layers have readable module names (``conv1``, ``fc2``, ...): they
become the ONNX node names, which ``compress --include/--exclude/--overrides`` use.

- ``mlp``: 784-300-100-10 style fully connected net (LeCun et al. 1998's classic FC benchmark).
- ``lenet5``: LeNet-5 with ReLU and max pooling, padding 2 so 28×28 inputs work as 32×32 did.
- ``resnet20``: the CIFAR ResNet-20 of He et al. 2016 (16/32/64 channels, BatchNorm, identity shortcuts
  with zero-padded channels, "option A").
- ``vgg``: a small VGG with BatchNorm: 2×16, 2×32, 2×64 3×3 convs, max pooling, global average pooling,
  two Linear layers.
- ``vit``: a tiny Vision Transformer (patch 7 or 4, width 64, 2 blocks of 4 heads, mean pooling).
- ``bncnn``: a CNN with BatchNorm whose convs are wide enough to carry redundancy (3×3 convs 1→32, 32→32,
  pool, 32→64, 64→64, pool, pool, Linear 64·3·3 → 128 → classes): the MACs sit in three convs with
  full ranks 32–64, so a whole-model MAC budget has room to choose ranks (the VGG's and LeNet-5's sit in
  convs of rank 16 or less). The third pool keeps the classifier small (< 1 MB in all).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lrdeploy.errors import UsageError

__all__ = ["ARCHS", "InputSpec", "Standardize", "build"]


@dataclass(frozen=True)
class InputSpec:
    """What a model must accept and produce: image channels and size, number of classes, pixel stats."""

    channels: int
    height: int
    width: int
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width


class Standardize(nn.Module):
    """(x − mean) / std per channel, with the training set's statistics as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    def __init__(self, spec: InputSpec, hidden: tuple[int, int] = (300, 100)) -> None:
        super().__init__()
        c, h, w = spec.shape
        self.standardize = Standardize(spec.mean, spec.std)
        self.fc1 = nn.Linear(c * h * w, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.standardize = Standardize(spec.mean, spec.std)
        self.conv1 = nn.Conv2d(spec.channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        h, w = (spec.height // 2 - 4) // 2, (spec.width // 2 - 4) // 2
        if h < 1 or w < 1:
            raise UsageError(f"lenet5 needs images of at least 12×12, got {spec.height}×{spec.width}")
        self.fc1 = nn.Linear(16 * h * w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(self.standardize(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BasicBlock(nn.Module):
    """Two 3×3 conv + BN; a strided block's shortcut subsamples and zero-pads the channels (option A)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = F.pad(
                x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad // 2, self.pad // 2)
            )
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    def __init__(self, spec: InputSpec, blocks: int = 3) -> None:
        super().__init__()
        self.standardize = Standardize(spec.mean, spec.std)
        self.conv1 = nn.Conv2d(spec.channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            stage = [
                BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks)
            ]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.standardize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


class VGG(nn.Module):
    def __init__(self, spec: InputSpec, widths: tuple[int, ...] = (16, 32, 64), hidden: int = 64) -> None:
        super().__init__()
        self.standardize = Standardize(spec.mean, spec.std)
        layers: list[nn.Module] = []
        cin = spec.channels
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                cin = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(cin, hidden)
        self.fc2 = nn.Linear(hidden, spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.standardize(x)).mean(dim=(2, 3))
        return self.fc2(F.relu(self.fc1(x)))


class BNCNN(nn.Module):
    def __init__(self, spec: InputSpec, widths: tuple[int, ...] = (32, 64), hidden: int = 128) -> None:
        super().__init__()
        h, w = spec.height // 8, spec.width // 8
        if h < 1 or w < 1:
            raise UsageError(f"bncnn needs images of at least 8×8, got {spec.height}×{spec.width}")
        self.standardize = Standardize(spec.mean, spec.std)
        layers: list[nn.Module] = []
        cin = spec.channels
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                cin = width
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(cin * h * w, hidden)
        self.fc2 = nn.Linear(hidden, spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.standardize(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3, B, heads, T, d
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attention @ v).transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, spec: InputSpec, dim: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        patch = next((p for p in (7, 4, 8, 2) if spec.height % p == 0 and spec.width % p == 0), 1)
        tokens = (spec.height // patch) * (spec.width // patch)
        self.standardize = Standardize(spec.mean, spec.std)
        self.patch = nn.Conv2d(spec.channels, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, spec.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(self.standardize(x)).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


ARCHS: dict[str, Callable[[InputSpec], nn.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "resnet20": ResNet20,
    "vgg": VGG,
    "vit": ViT,
    "bncnn": BNCNN,
}


def build(arch: str, spec: InputSpec) -> nn.Module:
    """A freshly initialized model of architecture ``arch`` for inputs and classes as in ``spec``."""
    if arch not in ARCHS:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch](spec)
