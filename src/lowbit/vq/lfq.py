"""Lookup-free quantization (LFQ, MAGVIT-v2, Yu et al. 2023) and binary spherical quantization (BSQ, Zhao et al. 2024).

Each channel becomes one bit: LFQ codes are sign(z) in {-1, 1}^d; BSQ first projects z onto the unit sphere and
uses sign(u)/sqrt(d), so codes lie on the sphere too. The index is the bit pattern read as a binary number.

The entropy loss (per-sample entropy minus gamma * codebook entropy) uses soft assignments
q(c | z) ~ exp(-|z - c|^2 / (temperature s^2)), s the code magnitude. For a sign codebook that distribution
factorises over channels: p(bit_i = 1) = sigmoid(4 z_i / (s temperature)), so no (N, 2^d) distance matrix is needed
for the per-sample term. The codebook term is exact up to ``exact_entropy_max_bits`` bits and uses the per-bit
factorised bound above that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Quantizer, QuantizerResult, check, straight_through
from .vector_quantize import make_config


@dataclass(frozen=True)
class LFQConfig:
    dim: int  # number of bits per token; codebook_size = 2 ** dim
    channel_dim: int = -1
    entropy_weight: float = 0.1
    diversity_gamma: float = 1.0  # weight of the codebook-entropy (usage spreading) term inside the entropy loss
    temperature: float = 1.0
    commitment_weight: float = 0.25
    exact_entropy_max_bits: int = 12

    def __post_init__(self) -> None:
        check(
            isinstance(self.dim, int) and 1 <= self.dim <= 62,
            "dim",
            f"must be an int in [1, 62] bits, got {self.dim!r}",
        )
        check(self.entropy_weight >= 0, "entropy_weight", f"must be >= 0, got {self.entropy_weight}")
        check(self.diversity_gamma >= 0, "diversity_gamma", f"must be >= 0, got {self.diversity_gamma}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.commitment_weight >= 0, "commitment_weight", f"must be >= 0, got {self.commitment_weight}")


def binary_entropy(p: Tensor, eps: float = 1e-8) -> Tensor:
    return -(p * (p + eps).log() + (1 - p) * (1 - p + eps).log())


class LFQ(Quantizer):
    """``LFQ(dim=10)``: 1024 implicit codes, codes in {-1, 1}^10."""

    spherical = False

    def __init__(self, config: LFQConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__()
        cfg: LFQConfig = make_config(LFQConfig, config, kwargs)
        self.config = cfg
        self.dim, self.channel_dim = cfg.dim, cfg.channel_dim
        self.register_buffer("bit_values", 2 ** torch.arange(cfg.dim, dtype=torch.long), persistent=False)
        # Code magnitude per channel: 1 for LFQ, 1/sqrt(d) for BSQ (unit-norm codes).
        self.scale = 1.0 / math.sqrt(cfg.dim) if self.spherical else 1.0

    @property
    def codebook_sizes(self) -> list[int]:
        return [2**self.config.dim]

    def entropy_terms(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(mean per-sample entropy, entropy of the mean assignment), both in nats."""
        cfg = self.config
        # -|z - c|^2 / (temperature * s^2): distances measured in units of the code magnitude s, so one temperature
        # means the same softness for LFQ (s = 1) and BSQ (s = 1/sqrt(d)).
        logits = 4 * z / (self.scale * cfg.temperature)
        p = torch.sigmoid(logits)  # (N, d): probability that bit i is 1
        per_sample = binary_entropy(p).sum(-1).mean()
        if cfg.dim <= cfg.exact_entropy_max_bits:
            bits = ((torch.arange(2**cfg.dim, device=z.device)[:, None] & self.bit_values) > 0).float()  # (K, d)
            log_joint = F.logsigmoid(logits) @ bits.t() + F.logsigmoid(-logits) @ (1 - bits).t()  # (N, K)
            avg = log_joint.exp().mean(0)
            codebook = -(avg * (avg + 1e-8).log()).sum()
        else:
            codebook = binary_entropy(p.mean(0)).sum()
        return per_sample, codebook

    def _quantize(self, x: Tensor) -> QuantizerResult:  # type: ignore[override]
        cfg = self.config
        z = F.normalize(x, dim=-1) if self.spherical else x
        positive = z > 0
        q = torch.where(positive, self.scale, -self.scale)
        indices = (positive.long() * self.bit_values).sum(-1)
        commitment = F.mse_loss(z, q)
        loss = cfg.commitment_weight * commitment
        aux = {"commitment": commitment.detach()}
        if cfg.entropy_weight > 0 and self.training:
            per_sample, codebook = self.entropy_terms(z)
            loss = loss + cfg.entropy_weight * (per_sample - cfg.diversity_gamma * codebook)
            aux["per_sample_entropy"] = per_sample.detach()
            aux["codebook_entropy"] = codebook.detach()
        return QuantizerResult(straight_through(z, q), indices, loss, aux)

    def _decode(self, indices: Tensor) -> Tensor:
        bits = (indices[:, None] & self.bit_values) > 0
        return torch.where(bits, self.scale, -self.scale).float()


class BSQ(LFQ):
    """``BSQ(dim=10)``: like LFQ, but inputs are l2-normalised and codes are sign(u)/sqrt(d) on the unit sphere."""

    spherical = True
