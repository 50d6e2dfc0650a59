"""Finite scalar quantization (Mentzer et al. 2023): round each channel to a fixed grid, no codebook to learn.

Channel i is bounded with tanh to L_i levels and rounded; the implicit codebook is the product grid of prod(L_i)
points, spaced evenly in [-1, 1]. No auxiliary loss, no collapse: every grid point is reachable by construction.
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
        # fp32 constants, precomputed: at token counts typical of a tokenizer, per-op overhead dominates FSQ.
        self.register_buffer("half_levels", levels.float() / 2, persistent=False)
        self.register_buffer("max_digit", (levels - 1).float(), persistent=False)
        self.register_buffer("half_width", (levels - 1).float() / 2, persistent=False)

    @property
    def codebook_sizes(self) -> list[int]:
        return [math.prod(self.config.levels)]

    def bound(self, z: Tensor) -> Tensor:
        """Squash channel i into (-0.5, L_i - 0.5) so rounding gives L_i equal-width bins (in tanh space).

        A symmetric variant of the paper's bound: its even-L offset puts z = 0 next to a bin edge and makes L = 2
        almost unreachable on one side; here every L >= 2 gets a grid symmetric about 0.
        """
        return (torch.tanh(z) + 1) * self.half_levels - 0.5

    def _quantize(self, x: Tensor) -> QuantizerResult:  # type: ignore[override]
        bounded = self.bound(x)
        # Clamp: tanh saturates to exactly +-1 in fp32, and round(L - 0.5) would step off the grid.
        digits = bounded.round().clamp_(min=0).minimum(self.max_digit)
        codes = self._digits_to_codes(straight_through(bounded, digits))
        indices = (digits.long() * self.basis).sum(dim=-1)
        return QuantizerResult(codes, indices, x.new_zeros(()), {})

    def _digits_to_codes(self, digits: Tensor) -> Tensor:
        return digits / self.half_width - 1  # grid points in [-1, 1]

    def _decode(self, indices: Tensor) -> Tensor:
        digits = (indices[:, None] // self.basis) % self.levels
        return self._digits_to_codes(digits.float())

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Inverse of ``indices_to_codes`` for codes with channels last."""
        digits = ((codes + 1) * self.half_width).round().long()
        return (digits * self.basis).sum(dim=-1)
