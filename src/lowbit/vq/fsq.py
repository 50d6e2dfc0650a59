"""Finite scalar quantization (Mentzer et al. 2023): round each channel to a fixed grid, no codebook to learn.

Channel i is bounded to L_i levels and rounded; the implicit codebook is the product grid of prod(L_i) points,
normalised to [-1, 1]. No auxiliary loss, no collapse: every grid point is reachable by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import Quantizer, QuantizerResult, check, straight_through
from .vector_quantize import make_config


@dataclass(frozen=True)
class FSQConfig:
    levels: tuple[int, ...]
    dim: int | None = None  # optional cross-check: must equal len(levels)
    channel_dim: int = -1

    def __post_init__(self) -> None:
        check(len(self.levels) >= 1, "levels", "need at least one level count")
        check(
            all(isinstance(v, int) and v >= 2 for v in self.levels),
            "levels",
            f"every entry must be an int >= 2, got {list(self.levels)}",
        )
        check(
            self.dim is None or self.dim == len(self.levels),
            "dim",
            f"FSQ quantizes one channel per level: dim={self.dim} but len(levels)={len(self.levels)}",
        )
        object.__setattr__(self, "levels", tuple(self.levels))


class FSQ(Quantizer):
    """``FSQ(levels=[8, 5, 5, 5])``: 1000 codes on 4 channels; index = mixed-radix number of the per-channel digits."""

    def __init__(self, config: FSQConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__()
        if "levels" in kwargs:
            kwargs["levels"] = tuple(kwargs["levels"])
        cfg: FSQConfig = make_config(FSQConfig, config, kwargs)
        self.config = cfg
        self.dim, self.channel_dim = len(cfg.levels), cfg.channel_dim
        levels = torch.tensor(cfg.levels, dtype=torch.long)
        self.register_buffer("levels", levels, persistent=False)
        basis = torch.cumprod(torch.tensor([1, *cfg.levels[:-1]], dtype=torch.long), dim=0)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def codebook_sizes(self) -> list[int]:
        return [math.prod(self.config.levels)]

    def bound(self, z: Tensor, eps: float = 1e-3) -> Tensor:
        """Squash to a range whose rounding yields exactly L values per channel (even L needs a half-step offset)."""
        levels = self.levels.to(z.dtype)
        half_l = (levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def _quantize(self, x: Tensor) -> QuantizerResult:  # type: ignore[override]
        bounded = self.bound(x)
        rounded = straight_through(bounded, bounded.round())
        half_width = (self.levels // 2).to(x.dtype)
        codes = rounded / half_width
        digits = (rounded.detach() + half_width).long()
        indices = (digits * self.basis).sum(dim=-1)
        return QuantizerResult(codes, indices, x.new_zeros(()), {})

    def _decode(self, indices: Tensor) -> Tensor:
        digits = (indices[:, None] // self.basis) % self.levels
        half_width = (self.levels // 2).float()
        return (digits.float() - half_width) / half_width

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Inverse of ``indices_to_codes`` for codes with channels last."""
        half_width = (self.levels // 2).to(codes.dtype)
        digits = (codes * half_width + half_width).round().long()
        return (digits * self.basis).sum(dim=-1)
