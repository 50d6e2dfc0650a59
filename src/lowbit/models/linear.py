"""Uniform access to the weight of every layer type lowbit quantizes: nn.Linear and GPT-2's Conv1D."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view for Conv1D, which stores ``[in, out]``)."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite the weight in place from an ``[out, in]`` tensor, keeping dtype and device."""
    target = module.weight
    if isinstance(module, Conv1D):
        weight = weight.t()
    with torch.no_grad():
        target.copy_(weight.to(dtype=target.dtype, device=target.device))


def in_features(module: nn.Module) -> int:
    return weight_of(module).shape[1]


def out_features(module: nn.Module) -> int:
    return weight_of(module).shape[0]
