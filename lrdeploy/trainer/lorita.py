"""LoRITa: low-rank induced training through linear layer composition (Yan et al., arXiv 2405.03089).

Each chosen layer becomes a composition of N linear maps with no nonlinearity between them:

    Conv2d k×k (Cin→Cout)  →  k×k Conv (Cin→Cout), then N−1 1×1 Convs (Cout→Cout)
    Linear (in→out)        →  N−1 square Linears (in→in), then the original Linear (in→out)

The product W = W_N ⋯ W_1 is the layer's weight, so the network computes the same function class; but
weight decay on the factors, λ/2·Σ_i ‖W_i‖_F², is at its minimum over all factorizations of W equal to
λ·N/2·Σ_j σ_j(W)^{2/N}, a Schatten-2/N quasi-norm of the product. For N ≥ 2 that penalizes the number of
large singular values more than their size and drives W towards low rank, which truncated SVD then
removes with little loss.

Before export `collapse_` multiplies each composition back into one layer, bias included:

    W = A_{N−1} ⋯ A_1 · W_0          b = A_{N−1}(⋯(A_1 b_0 + b_1)⋯) + b_{N−1}

(W_0 the first factor as a [Cout, Cin·k·k] matrix, A_i the later ones as matrices), so the exported ONNX has
the original architecture and its BatchNorm layers untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lrdeploy.errors import UsageError
from lrdeploy.trainer.selection import candidates, check_patterns

__all__ = ["INITS", "Composition", "LoRITaConfig", "collapse_", "overparameterize_"]

#: How the added square factors start: "orthogonal" (the product starts with the singular values of a
#: default-initialized layer) or "default" (PyTorch's init for every factor, as in the authors' code).
INITS = ("orthogonal", "default")


@dataclass(frozen=True)
class LoRITaConfig:
    """Replace the chosen Linear/Conv2d layers by compositions of ``factor`` linear maps."""

    factor: int = 3
    init: str = "orthogonal"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    name = "lorita"
    default_lr = 0.02
    default_weight_decay = 5e-3

    def __post_init__(self) -> None:
        if not isinstance(self.factor, int) or isinstance(self.factor, bool) or self.factor < 2:
            raise UsageError(f"--factor must be an integer ≥ 2 (the paper uses 2 or 3), got {self.factor!r}")
        if self.init not in INITS:
            raise UsageError(f"LoRITa init must be one of {', '.join(INITS)}, got {self.init!r}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict:
        return {
            "method": self.name,
            "factor": self.factor,
            "init": self.init,
            "include": list(self.include),
            "exclude": list(self.exclude),
        }


class Composition(nn.Sequential):
    """Linear maps applied in order with nothing between them; `collapse` returns their product."""

    def collapse(self) -> nn.Module:
        first, last = self[0], self[-1]
        with torch.no_grad():
            weight = first.weight.detach().reshape(first.weight.shape[0], -1).to(torch.float64)
            bias = _bias(first)
            for layer in list(self)[1:]:
                matrix = layer.weight.detach().reshape(layer.weight.shape[0], -1).to(torch.float64)
                weight = matrix @ weight
                bias = matrix @ bias + _bias(layer)
            has_bias = any(layer.bias is not None for layer in self)
            if isinstance(first, nn.Conv2d):
                merged: nn.Module = nn.Conv2d(
                    first.in_channels,
                    last.out_channels,
                    first.kernel_size,
                    stride=first.stride,
                    padding=first.padding,
                    dilation=first.dilation,
                    bias=has_bias,
                    padding_mode=first.padding_mode,
                )
            else:
                merged = nn.Linear(first.in_features, last.out_features, bias=has_bias)
            merged = merged.to(device=first.weight.device, dtype=first.weight.dtype)
            merged.weight.copy_(weight.reshape(merged.weight.shape))
            if has_bias:
                merged.bias.copy_(bias)
        return merged


def _bias(layer: nn.Module) -> torch.Tensor:
    out = layer.weight.shape[0]
    if layer.bias is None:
        return torch.zeros(out, dtype=torch.float64, device=layer.weight.device)
    return layer.bias.detach().to(torch.float64)


def _compose(layer: nn.Module, factor: int, init: str) -> Composition:
    """The composition for one layer; the original layer's bias ends up on the last factor."""
    device, dtype = layer.weight.device, layer.weight.dtype
    bias = layer.bias is not None
    if isinstance(layer, nn.Conv2d):
        out = layer.out_channels
        parts: list[nn.Module] = [
            nn.Conv2d(
                layer.in_channels,
                out,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                bias=False,
                padding_mode=layer.padding_mode,
            )
        ]
        parts += [nn.Conv2d(out, out, 1, bias=False) for _ in range(factor - 2)]
        parts.append(nn.Conv2d(out, out, 1, bias=bias))
        added = parts[1:]
    else:
        width = layer.in_features
        parts = [nn.Linear(width, width, bias=False) for _ in range(factor - 1)]
        parts.append(nn.Linear(width, layer.out_features, bias=bias))
        added = parts[:-1]
    if init == "orthogonal":
        for part in added:
            nn.init.orthogonal_(part.weight)
    return Composition(*parts).to(device=device, dtype=dtype)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def overparameterize_(model: nn.Module, config: LoRITaConfig) -> list[str]:
    """Replace the chosen layers of ``model`` in place by fresh compositions; return their names.

    LoRITa trains the composed network from scratch; it does not re-factor a trained layer. With
    ``init="orthogonal"`` the square factors start orthogonal, so the product has the singular values of a
    default-initialized layer: with PyTorch's default init for every factor (the authors' choice, harmless
    in their nets, which have BatchNorm after every layer) each factor shrinks the signal by about √3, and
    BN-free nets such as LeNet-5 with N = 3 did not train at all.
    """
    check_patterns(model, config.include, config.exclude)
    chosen = [name for name in candidates(model, config.include, config.exclude) if name]
    for name in chosen:
        _replace(model, name, _compose(model.get_submodule(name), config.factor, config.init))
    return chosen


def collapse_(model: nn.Module) -> list[str]:
    """Replace every composition in ``model`` by the single layer it computes; return their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, Composition)]
    for name in names:
        _replace(model, name, model.get_submodule(name).collapse())
    return names
