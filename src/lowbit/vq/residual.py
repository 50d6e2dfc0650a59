"""Residual VQ (SoundStream, Zeghidour et al. 2021) and its grouped variant.

Each stage quantizes what the previous stages left over; the output is the sum of the stage codes. The gradient
estimator is applied once to the sum (applying it per stage would hand the input ``num_quantizers`` copies of the
gradient). Quantizer dropout trains every prefix of stages so one model serves several bitrates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantizerResult, broadcast_, check, gradient_estimator, merge_aux
from .vector_quantize import VectorQuantize, VQConfig, make_config


def stage_config(dim: int, codebook_size: int, vq: dict[str, Any], field_name: str = "vq") -> VQConfig:
    """Validate the per-stage VectorQuantize options; errors name both the container and the field."""
    check("channel_dim" not in vq and "dim" not in vq, field_name, "set dim/channel_dim on the outer layer")
    try:
        return VQConfig(dim=dim, codebook_size=codebook_size, channel_dim=-1, **vq)
    except TypeError as exc:
        raise ValueError(f"{field_name}: {exc}") from None


@dataclass(frozen=True)
class ResidualVQConfig:
    dim: int
    num_quantizers: int
    codebook_size: int
    channel_dim: int = -1
    quantizer_dropout: float = 0.0  # chance that a training batch keeps only the first n ~ U{1..N} stages
    vq: dict[str, Any] = field(default_factory=dict)  # extra VQConfig fields for every stage (gradient, ema, ...)

    def __post_init__(self) -> None:
        check(self.num_quantizers >= 1, "num_quantizers", f"must be >= 1, got {self.num_quantizers}")
        check(
            0.0 <= self.quantizer_dropout <= 1.0,
            "quantizer_dropout",
            f"must be in [0, 1], got {self.quantizer_dropout}",
        )
        stage_config(self.dim, self.codebook_size, self.vq)


def sample_active(num: int, dropout: float, training: bool, requested: int | None, device: torch.device) -> int:
    """How many stages to run: the requested count, else a random prefix under quantizer dropout, else all."""
    if requested is not None:
        check(1 <= requested <= num, "n_quantizers", f"must be in [1, {num}], got {requested}")
        return requested
    if not training or dropout <= 0:
        return num
    n = torch.randint(1, num + 1, ()) if float(torch.rand(())) < dropout else torch.tensor(num)
    return int(broadcast_(n.to(device)))  # every data-parallel rank must drop the same stages


class ResidualVQ(Quantizer):
    """``ResidualVQ(dim=64, num_quantizers=4, codebook_size=256, vq={"kmeans_init": True})``."""

    multi_codebook = True

    def __init__(self, config: ResidualVQConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__()
        cfg: ResidualVQConfig = make_config(ResidualVQConfig, config, kwargs)
        self.config = cfg
        self.dim, self.channel_dim, self.num_codebooks = cfg.dim, cfg.channel_dim, cfg.num_quantizers
        stage = stage_config(cfg.dim, cfg.codebook_size, cfg.vq)
        self._grad = gradient_estimator(stage.gradient)
        self.layers = nn.ModuleList(VectorQuantize(stage) for _ in range(cfg.num_quantizers))

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size] * self.config.num_quantizers

    def _quantize(  # type: ignore[override]
        self, x: Tensor, n_quantizers: int | None = None, apply_gradient: bool = True
    ) -> QuantizerResult:
        active = sample_active(len(self.layers), self.config.quantizer_dropout, self.training, n_quantizers, x.device)
        residual = x
        total = torch.zeros_like(x)
        loss = x.new_zeros(())
        aux: dict[str, Tensor] = {}
        columns = []
        for i, layer in enumerate(self.layers):
            if i >= active:  # dropped stage: index -1, contributes nothing
                columns.append(torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device))
                continue
            r = layer._quantize(residual, apply_gradient=False)
            total = total + r.quantized
            residual = residual - r.quantized.detach()
            loss = loss + r.loss
            merge_aux(aux, r.aux)
            columns.append(r.indices)
        out = self._grad(x, total) if apply_gradient else total
        return QuantizerResult(out, torch.stack(columns, dim=1), loss, aux)

    def _decode(self, indices: Tensor) -> Tensor:
        out = None
        for i, layer in enumerate(self.layers):
            col = indices[:, i]
            codes = layer._decode(col.clamp_min(0)) * (col >= 0).unsqueeze(1)
            out = codes if out is None else out + codes
        return out


@dataclass(frozen=True)
class GroupedResidualVQConfig:
    dim: int
    groups: int
    num_quantizers: int
    codebook_size: int
    channel_dim: int = -1
    quantizer_dropout: float = 0.0
    vq: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.groups >= 1, "groups", f"must be >= 1, got {self.groups}")
        check(self.dim % self.groups == 0, "dim", f"dim={self.dim} is not divisible by groups={self.groups}")
        ResidualVQConfig(
            self.dim // self.groups, self.num_quantizers, self.codebook_size, -1, self.quantizer_dropout, self.vq
        )


class GroupedResidualVQ(Quantizer):
    """Channels split into ``groups``, each quantized by its own ResidualVQ; indices are group-major."""

    multi_codebook = True

    def __init__(self, config: GroupedResidualVQConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__()
        cfg: GroupedResidualVQConfig = make_config(GroupedResidualVQConfig, config, kwargs)
        self.config = cfg
        self.dim, self.channel_dim = cfg.dim, cfg.channel_dim
        self.num_codebooks = cfg.groups * cfg.num_quantizers
        sub = ResidualVQConfig(cfg.dim // cfg.groups, cfg.num_quantizers, cfg.codebook_size, -1, 0.0, cfg.vq)
        self.rvqs = nn.ModuleList(ResidualVQ(sub) for _ in range(cfg.groups))

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size] * self.num_codebooks

    def _quantize(self, x: Tensor, n_quantizers: int | None = None) -> QuantizerResult:  # type: ignore[override]
        cfg = self.config
        # One draw for all groups, so a dropped bitrate means the same thing in every group.
        active = sample_active(cfg.num_quantizers, cfg.quantizer_dropout, self.training, n_quantizers, x.device)
        outs, cols, loss, aux = [], [], x.new_zeros(()), {}
        for rvq, chunk in zip(self.rvqs, x.chunk(cfg.groups, dim=-1)):
            r = rvq._quantize(chunk, n_quantizers=active)
            outs.append(r.quantized)
            cols.append(r.indices)
            loss = loss + r.loss
            merge_aux(aux, r.aux)
        return QuantizerResult(torch.cat(outs, dim=-1), torch.cat(cols, dim=1), loss, aux)

    def _decode(self, indices: Tensor) -> Tensor:
        n = self.config.num_quantizers
        return torch.cat([rvq._decode(indices[:, g * n : (g + 1) * n]) for g, rvq in enumerate(self.rvqs)], dim=-1)
