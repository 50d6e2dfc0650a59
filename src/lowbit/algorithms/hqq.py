"""HQQ (Badri & Shaji, 2023): calibration-free half-quadratic optimisation of the zero-point.

With the scale fixed by the min-max range, HQQ minimises an l_p (p < 1) norm of the weight error,
which tolerates the few large errors of outliers instead of letting them pull every weight, by
alternating (1) rounding, (2) a generalised soft-threshold of the error ("shrinkage") and (3) a
closed-form zero-point update; the penalty weight ``beta`` grows by ``kappa`` each iteration.

The iterates are the same whatever ``stop`` says (each group's update depends only on that group
and on ``beta``); ``stop`` chooses when to stop and which iterate each group keeps, both judged by
the mean absolute error as in the reference:

* ``"global"``, the paper's solver and the hqq package's default (``optimize_weights_proximal``,
  a.k.a. ``_legacy``): one error, the mean over the whole tensor; the loop stops at the first
  iterate that does not strictly lower it and keeps, for all groups, the zero-points computed last:
  the update made *after* that iterate (not the best iterate), or after the last iteration.
  Groups still improving are cut short with the rest; groups that got worse keep their last zero.
* ``"per_group"`` (lowbit's default): each group keeps, among the iterates and that last update,
  the one with its own least error; the loop also runs on while any group still improves on its
  best. It never stops before the global rule would, so every group's candidates include the
  zero-point ``"global"`` keeps: each group's mean absolute error is at most the one ``"global"``
  gives it (and at most its error at the min-max start), before the zero-point is rounded to its
  storage type. Not so in the l_p norm, which neither rule measures.

Deliberate differences from the hqq package, whichever ``stop``: the solve runs in float32 (hqq:
float16 on CUDA) with the scale as it is stored (hqq optimises with a float32 scale and casts it to
the compute dtype afterwards), quantizes with ``w / scale`` (hqq: ``w * (1 / scale)``, equal up to
an ulp), gives degenerate groups a tiny scale (hqq: scale 1 below a range of 1e-4, at least 5e-5),
starts from the fractional zero-point -min / scale (as ``Quantizer.quantize`` does; hqq's
``BaseQuantizeConfig`` rounds it at 4 bits) and encodes the codes with the zero-point as stored
(rounded to ``zero_dtype``). hqq >= 0.2.7's default solver no longer grows ``beta`` (``kappa`` is
read but unused); ``kappa=1`` reproduces it.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from ..formats import GGML_TYPES, QParams, QuantizedTensor, Quantizer
from ..formats.quantizer import check_finite
from ..models import weight_of
from .base import EstimateInputs, Step, StepEstimate, WeightQuantConfig, register_step


class HQQConfig(WeightQuantConfig):
    """HQQ options (besides the format; HQQ needs an asymmetric integer format with float zeros, or
    one that stores mins: q4_1, q5_1 and the asymmetric K-quants q2_k, q4_k, q5_k).

    Attributes:
        iters: maximum optimisation iterations.
        lp_norm: the ``p`` of the l_p error norm (HQQ's default 0.7).
        beta, kappa: initial penalty weight and its growth per iteration (``kappa=1``: the hqq
            package's default solver since 0.2.7, which keeps ``beta`` fixed).
        early_stop: stop when the mean absolute error stops decreasing (see ``stop``); without
            it, all ``iters`` iterations run.
        stop: which zero-point each group keeps. ``"global"``: the paper's and the hqq package's
            rule: one error for the whole tensor, stop at the first iterate that does not lower
            it, keep the zero-points computed last (the update after that iterate). ``"per_group"``
            (default): each group keeps its candidate of least mean absolute error, running on
            while any group improves; per group never worse than ``"global"`` in that error.
    """

    symmetric: bool | None = False
    iters: int = Field(20, ge=1)
    lp_norm: float = Field(0.7, gt=0.0, le=1.0)
    beta: float = Field(10.0, gt=0.0)
    kappa: float = Field(1.01, ge=1.0)
    early_stop: bool = True
    stop: Literal["per_group", "global"] = "per_group"

    def model_post_init(self, __context) -> None:
        if "symmetric" not in self.model_fields_set and str(self.format).lower() in GGML_TYPES:
            self.symmetric = None  # llama.cpp's formats fix their own; the check below names those HQQ takes
        super().model_post_init(__context)
        spec = self.spec
        if spec.kind != "int" or spec.symmetric:
            raise ValueError(
                f"format: HQQ optimises zero-points, so it needs an asymmetric integer format, got {spec.label()}"
                + (" (of llama.cpp's formats: q4_1, q5_1, q2_k, q4_k, q5_k)" if spec.ggml_type else "")
            )
        if spec.zero_dtype == "int":
            raise ValueError("format.zero_dtype: HQQ zero-points are fractional; use a float zero_dtype")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the l_p norm (generalised soft-thresholding)."""
    mag = x.abs()
    return torch.sign(x) * torch.relu(mag - mag.clamp(min=1e-12).pow(p - 1) / beta)


@torch.no_grad()
def hqq_quantize(weight: torch.Tensor, quantizer: Quantizer, cfg: HQQConfig) -> QuantizedTensor:
    """HQQ's zero-points for ``weight``. Formats that store a min (``zero_style="min"``: llama.cpp's
    Q4_1/Q5_1 and K-quants) take the optimised zero-point ``z`` as the min ``m = z * s`` (the same
    line ``w = s*q - m = (q - z)*s``), rounded to the min's storage (fp16, or 4-/6-bit codes of
    an fp16 super-min); the codes are then the nearest on that final grid."""
    check_finite(weight)
    quantizer.check_shape(tuple(weight.shape))
    w2 = quantizer.as_2d(weight.detach().float())
    wg = quantizer.group_view(w2)
    # The group's own range (not widened to include 0, as integer zero-points need): the zero-point
    # HQQ optimises is fractional anyway.
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    ideal_scale = (hi - lo).clamp(min=1e-8) / quantizer.qmax
    with_min = quantizer.spec.zero_style == "min"
    if with_min:  # the scale as stored (super-block formats: integer times the fp16 super-scale)
        applied = quantizer.store_params(ideal_scale).effective_scale()
        # a super-scale that underflowed fp16 (an all-zero super-block): every code decodes to -m
        scale = torch.where(applied > 0, applied, torch.ones_like(applied))
    else:
        scale = quantizer.store_scale(ideal_scale, None)
    zero = -lo / scale
    qmax = quantizer.qmax
    beta = cfg.beta
    per_group = cfg.stop == "per_group"
    best_zero, best_err = zero.clone(), torch.full_like(zero, float("inf"))
    last_total = float("inf")
    for _ in range(cfg.iters):
        wq = torch.clamp(torch.round(wg / scale + zero), 0, qmax)
        wr = (wq - zero) * scale
        diff = (wg - wr).abs()
        # the reference's error: one mean over the whole tensor
        total = diff.mean().item()
        done = cfg.early_stop and not total < last_total
        last_total = total
        if per_group:
            err = diff.mean(-1, keepdim=True)
            improved = err < best_err
            best_err = torch.where(improved, err, best_err)
            best_zero = torch.where(improved, zero, best_zero)
            # also run while the tensor error falls, so as never to stop before the global rule
            done = done and not improved.any()
        we = shrink_lp(wg - wr, beta, cfg.lp_norm)
        zero = (wq - (wg - we) / scale).mean(-1, keepdim=True)
        beta *= cfg.kappa
        # the reference updates the zero-points before it checks the error, and keeps that update
        if done:
            break
    if per_group:
        # the last update is a candidate too: it is what the global rule keeps
        wr = (torch.clamp(torch.round(wg / scale + zero), 0, qmax) - zero) * scale
        err = (wg - wr).abs().mean(-1, keepdim=True)
        zero = torch.where(err < best_err, zero, best_zero)
    if with_min:
        p = quantizer.store_params(ideal_scale, zero * applied)
    else:
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
            quantizer.spec.zero_dtype
        ]
        p = QParams(scale, zero.to(dtype).float())
    codes = quantizer.encode(wg, p).reshape(w2.shape)
    return QuantizedTensor.from_params(codes, p, quantizer.spec, tuple(weight.shape))


@register_step
class HQQ(Step):
    """Half-quadratic quantization: data-free zero-point optimisation."""

    name = "hqq"
    Config = HQQConfig
    quantizes_weights = True

    def integer_zero_points(self) -> bool:
        return False  # HQQ optimises the zero-point continuously

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
