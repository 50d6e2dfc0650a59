"""Product quantization (Jégou et al. 2011): split each vector into sub-vectors, one codebook per slice.

M codebooks of K codes address K^M combinations for the cost of M*K stored codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerResult, check, merge_aux
from .residual import stage_config
from .vector_quantize import VectorQuantize, make_config


@dataclass(frozen=True)
class ProductQuantizeConfig:
    dim: int
    num_subvectors: int
    codebook_size: int
    channel_dim: int = -1
    vq: dict[str, Any] = field(default_factory=dict)  # extra VQConfig fields for every sub-quantizer

    def __post_init__(self) -> None:
        check(self.num_subvectors >= 1, "num_subvectors", f"must be >= 1, got {self.num_subvectors}")
        check(
            self.dim % self.num_subvectors == 0,
            "dim",
            f"dim={self.dim} is not divisible by num_subvectors={self.num_subvectors}",
        )
        stage_config(self.dim // self.num_subvectors, self.codebook_size, self.vq)


class ProductQuantize(Quantizer):
    """``ProductQuantize(dim=16, num_subvectors=2, codebook_size=16)``: indices of shape (..., num_subvectors)."""

    multi_codebook = True

    def __init__(self, config: ProductQuantizeConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__()
        cfg: ProductQuantizeConfig = make_config(ProductQuantizeConfig, config, kwargs)
        self.config = cfg
        self.dim, self.channel_dim, self.num_codebooks = cfg.dim, cfg.channel_dim, cfg.num_subvectors
        sub = stage_config(cfg.dim // cfg.num_subvectors, cfg.codebook_size, cfg.vq)
        self.quantizers = nn.ModuleList(VectorQuantize(sub) for _ in range(cfg.num_subvectors))

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size] * self.config.num_subvectors

    def _quantize(self, x: Tensor) -> QuantizerResult:  # type: ignore[override]
        outs, cols, loss, aux = [], [], x.new_zeros(()), {}
        # Slices are disjoint, so each sub-quantizer's own gradient estimator is exact for its channels.
        for vq, chunk in zip(self.quantizers, x.chunk(self.config.num_subvectors, dim=-1)):
            r = vq._quantize(chunk)
            outs.append(r.quantized)
            cols.append(r.indices)
            loss = loss + r.loss
            merge_aux(aux, r.aux)
        return QuantizerResult(torch.cat(outs, dim=-1), torch.stack(cols, dim=1), loss, aux)

    def _decode(self, indices: Tensor) -> Tensor:
        return torch.cat([vq._decode(indices[:, m]) for m, vq in enumerate(self.quantizers)], dim=-1)
