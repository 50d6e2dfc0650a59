"""HQQ (Badri & Shaji, 2023): calibration-free half-quadratic optimisation of the zero-point.

With the scale fixed by the min-max range, HQQ minimises an l_p (p < 1) norm of the weight error,
which tolerates the few large errors of outliers instead of letting them pull every weight, by
alternating (1) rounding, (2) a generalised soft-threshold of the error ("shrinkage") and (3) a
closed-form zero-point update; the penalty weight ``beta`` grows by ``kappa`` each iteration.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field

from ..formats import QParams, QuantizedTensor, Quantizer
from ..formats.quantizer import check_finite
from ..models import weight_of
from .base import EstimateInputs, Step, StepEstimate, WeightQuantConfig, register_step


class HQQConfig(WeightQuantConfig):
    """HQQ options (besides the format; HQQ needs an asymmetric integer format with float zeros).

    Attributes:
        iters: maximum optimisation iterations.
        lp_norm: the ``p`` of the l_p error norm (HQQ's default 0.7).
        beta, kappa: initial penalty weight and its growth per iteration.
        early_stop: stop when the mean absolute error stops decreasing.
    """

    symmetric: bool | None = False
    iters: int = Field(20, ge=1)
    lp_norm: float = Field(0.7, gt=0.0, le=1.0)
    beta: float = Field(10.0, gt=0.0)
    kappa: float = Field(1.01, ge=1.0)
    early_stop: bool = True

    def model_post_init(self, __context) -> None:
        super().model_post_init(__context)
        spec = self.spec
        if spec.kind != "int" or spec.symmetric:
            raise ValueError(
                f"format: HQQ optimises zero-points, so it needs an asymmetric integer format, got {spec.label()}"
            )
        if spec.zero_dtype == "int":
            raise ValueError("format.zero_dtype: HQQ zero-points are fractional; use a float zero_dtype")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the l_p norm (generalised soft-thresholding)."""
    mag = x.abs()
    return torch.sign(x) * torch.relu(mag - mag.clamp(min=1e-12).pow(p - 1) / beta)


@torch.no_grad()
def hqq_quantize(weight: torch.Tensor, quantizer: Quantizer, cfg: HQQConfig) -> QuantizedTensor:
    check_finite(weight)
    w2 = quantizer.as_2d(weight.detach().float())
    wg = quantizer.group_view(w2)
    # The group's own range (not widened to include 0, as integer zero-points need): the zero-point
    # HQQ optimises is fractional anyway.
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = quantizer.store_scale((hi - lo).clamp(min=1e-8) / quantizer.qmax, None)
    zero = -lo / scale
    qmax = quantizer.qmax
    beta = cfg.beta
    best_zero, best_err = zero.clone(), torch.full_like(zero, float("inf"))
    for _ in range(cfg.iters):
        wq = torch.clamp(torch.round(wg / scale + zero), 0, qmax)
        wr = (wq - zero) * scale
        err = (wg - wr).abs().mean(-1, keepdim=True)
        improved = err < best_err
        best_err = torch.where(improved, err, best_err)
        best_zero = torch.where(improved, zero, best_zero)
        if cfg.early_stop and not improved.any():
            break
        we = shrink_lp(wg - wr, beta, cfg.lp_norm)
        zero = (wq - (wg - we) / scale).mean(-1, keepdim=True)
        beta *= cfg.kappa
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[quantizer.spec.zero_dtype]
    best_zero = best_zero.to(dtype).float()
    p = QParams(scale, best_zero)
    codes = quantizer.encode(wg, p).reshape(w2.shape)
    return QuantizedTensor(codes, scale[..., 0], best_zero[..., 0], None, quantizer.spec, tuple(weight.shape))


@register_step
class HQQ(Step):
    """Half-quadratic quantization: data-free zero-point optimisation."""

    name = "hqq"
    Config = HQQConfig
    quantizes_weights = True

    def estimate(self, inputs: EstimateInputs) -> StepEstimate:
        """Data-free; each iteration rounds, shrinks and averages every weight (about 30 operations
        each) on a float32 copy with a few temporaries of its size."""
        numel = sum(rows * cols for rows, cols in inputs.layers.values())
        return StepEstimate(memory_bytes=5 * 4 * inputs.largest, flops=30.0 * self.config.iters * numel)

    def apply(self, unit) -> None:
        quantizer = Quantizer(self.config.spec)
        for name, module in unit.select(self.config).items():
            start = time.perf_counter()
            qt = hqq_quantize(weight_of(module), quantizer, self.config)
            unit.commit(name, module, qt, self.name, seconds=time.perf_counter() - start)
