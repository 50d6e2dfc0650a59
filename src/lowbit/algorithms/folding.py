"""Moving per-channel scales between a producer (norm or linear) and the linears that read it.

If a producer's output channel ``j`` is divided by ``s_j`` and every consumer's input column ``j``
is multiplied by ``s_j``, the network computes the same function. AWQ and SmoothQuant use this to
make weights easier to quantize without changing the full-precision model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import is_linear, set_weight, weight_of


class FoldError(ValueError):
    """A scale cannot be folded into the given producer."""


@torch.no_grad()
def divide_producer_outputs(prev: nn.Module, s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide the output channels of ``prev`` by ``s``.

    ``norm_offset`` covers norms that compute ``x * (offset + weight)`` (Gemma's RMSNorm).
    """
    s = s.detach().float()
    if is_linear(prev):
        w = weight_of(prev).detach().float()
        set_weight(prev, w / s[:, None].to(w.device))
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias.copy_((bias.float() / s.to(bias.device)).to(bias.dtype))
        return
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or weight.shape[0] != s.shape[0]:
        raise FoldError(f"cannot fold a scale of size {s.shape[0]} into {type(prev).__name__}")
    s = s.to(weight.device)
    weight.copy_(((norm_offset + weight.float()) / s - norm_offset).to(weight.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / s).to(bias.dtype))


@torch.no_grad()
def multiply_consumer_inputs(linears: list[nn.Module], s: torch.Tensor) -> None:
    """Multiply input column ``j`` of every linear by ``s_j``."""
    for lin in linears:
        w = weight_of(lin).detach().float()
        set_weight(lin, w * s[None, :].to(w.device, torch.float32))
