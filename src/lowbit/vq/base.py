"""The one contract every VQ layer follows, plus the shared gradient estimators.

Every quantizer takes a tensor of any shape whose ``channel_dim`` axis has ``dim`` channels and returns a
:class:`VQOutput`. Indices have the input's shape without the channel axis; layers with several codebooks
(residual, grouped, product) add a trailing axis of ``num_codebooks``. ``indices_to_codes`` inverts that.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn


class VQOutput(NamedTuple):
    quantized: Tensor  # same shape and dtype as the input
    indices: Tensor  # int64; input shape minus the channel axis (+ trailing codebook axis for multi-codebook layers)
    loss: Tensor  # scalar: the weighted sum of every auxiliary loss term, ready to add to the task loss
    aux: dict[str, Tensor]  # named loss terms (unweighted) and diagnostics, all scalars


class QuantizerResult(NamedTuple):
    """What ``_quantize`` returns on flattened ``(N, dim)`` fp32 rows."""

    quantized: Tensor  # (N, dim)
    indices: Tensor  # (N,) or (N, num_codebooks)
    loss: Tensor
    aux: dict[str, Tensor]


def check(ok: bool, field: str, message: str) -> None:
    """Raise a ValueError that names the offending config field."""
    if not ok:
        raise ValueError(f"{field}: {message}")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` in place across data-parallel ranks (no-op when torch.distributed is not running)."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Make every rank hold rank ``src``'s copy, so random choices (k-means seeds, restarts) agree."""
    if distributed():
        dist.broadcast(t, src)
    return t


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Forward value ``q``, gradient to ``x`` unchanged (van den Oord et al. 2017)."""
    return x + (q - x).detach()


def rotation_trick(x: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """Forward value ``q``; the gradient reaching ``x`` is rotated and scaled as ``x`` -> ``q`` (Fifty et al. 2024).

    Output = sg(lambda R) x with R the rotation taking x/|x| to q/|q| and lambda = |q|/|x|. R is applied with two
    Householder-style rank-one terms instead of building a (dim, dim) matrix per row.
    """
    with torch.no_grad():
        x_norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
        q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
        u = x / x_norm
        v = q / q_norm
        w = u + v
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(eps)
        scale = q_norm / x_norm
    # R x = x - 2 w (w.x) + 2 v (u.x); only x carries gradient.
    rotated = x - 2 * w * (w * x).sum(-1, keepdim=True) + 2 * v * (u * x).sum(-1, keepdim=True)
    out = scale * rotated
    # Rows where x or q is ~0 have no defined rotation: fall back to the straight-through estimator there.
    degenerate = (x_norm <= eps) | (q_norm <= eps)
    if bool(degenerate.any()):
        out = torch.where(degenerate, straight_through(x, q), out)
    # Make the forward value exactly q (the algebra above only matches it up to rounding).
    return out + (q - out).detach()


def gradient_estimator(name: str):
    return {"ste": straight_through, "rotation": rotation_trick}[name]


class Quantizer(nn.Module):
    """Base class: handles layout (channel axis, any leading shape) and fp32 math; subclasses see ``(N, dim)`` rows."""

    dim: int
    channel_dim: int
    num_codebooks: int = 1  # index columns per token
    multi_codebook: bool = False  # whether indices carry a trailing codebook axis

    @property
    def codebook_sizes(self) -> list[int]:
        """Number of codes in each codebook (one entry per index column)."""
        raise NotImplementedError

    @property
    def codebook_size(self) -> int:
        """Distinct codes per codebook (the largest, for mixed layers)."""
        return max(self.codebook_sizes)

    @property
    def bits_per_token(self) -> float:
        """Nominal bits needed to store one token's indices."""
        return float(sum(math.log2(k) for k in self.codebook_sizes))

    def _quantize(self, x: Tensor, **kwargs: Any) -> QuantizerResult:
        raise NotImplementedError

    def _decode(self, indices: Tensor) -> Tensor:
        """(N,) or (N, num_codebooks) int64 -> (N, dim) fp32 codes."""
        raise NotImplementedError

    def _channel_axis(self, ndim: int) -> int:
        c = self.channel_dim
        if not -ndim <= c < ndim:
            raise ValueError(f"channel_dim={c} is out of range for a {ndim}-d input")
        return c % ndim

    def forward(self, x: Tensor, **kwargs: Any) -> VQOutput:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} expects a floating-point tensor, got {getattr(x, 'dtype', type(x))}"
            )
        if x.ndim < 2:
            raise ValueError(
                f"{type(self).__name__} expects at least 2 dims (tokens and channels), got shape {tuple(x.shape)}"
            )
        c = self._channel_axis(x.ndim)
        if x.shape[c] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects {self.dim} channels on axis {self.channel_dim}, "
                f"got shape {tuple(x.shape)}"
            )
        moved = x.movedim(c, -1)
        lead = moved.shape[:-1]
        # fp32 math even under autocast: rounding to bf16 merges neighbouring codes and wastes the codebook.
        with torch.autocast(device_type=x.device.type, enabled=False):
            res = self._quantize(moved.reshape(-1, self.dim).float(), **kwargs)
        quantized = res.quantized.to(x.dtype).reshape(*lead, self.dim).movedim(-1, c)
        indices = res.indices.reshape(*lead, *res.indices.shape[1:])
        return VQOutput(quantized, indices, res.loss, res.aux)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Decode indices from ``forward`` back to the quantized tensor (same layout as the input)."""
        if indices.is_floating_point():
            raise TypeError("indices must be an integer tensor")
        if self.multi_codebook:
            if indices.ndim < 1 or indices.shape[-1] != self.num_codebooks:
                raise ValueError(
                    f"{type(self).__name__} indices need a trailing axis of {self.num_codebooks} codebooks, "
                    f"got shape {tuple(indices.shape)}"
                )
            lead = indices.shape[:-1]
            flat = indices.reshape(-1, self.num_codebooks)
        else:
            lead = indices.shape
            flat = indices.reshape(-1)
        codes = self._decode(flat.long()).reshape(*lead, self.dim)
        if codes.ndim < 2:
            return codes
        return codes.movedim(-1, self._channel_axis(codes.ndim))


def merge_aux(total: dict[str, Tensor], aux: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum same-named terms from several sub-quantizers (commitment of every stage, restarts, ...)."""
    for name, value in aux.items():
        total[name] = total[name] + value if name in total else value
    return total
