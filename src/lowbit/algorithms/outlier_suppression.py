"""Outlier Suppression+ (Wei et al., 2023): shift and scale activation channels before W8A8.

Outlier channels are often asymmetric (a channel lives in ``[3, 40]``, not ``[-40, 40]``) and
concentrated in a few channels. For each group of linears that read one input ``X`` made by a norm
or a linear (as SmoothQuant's groups):

- **shift**: ``z_j = (max X_j + min X_j) / 2`` centres every channel. ``X - z`` is folded into the
  producer's bias (``beta - z``) and the consumers' biases (``b + W z``), so it needs both: norms
  with a bias (LayerNorm, not RMSNorm) or ``v`` before ``o`` (attention's weights sum to one, so a
  shift of ``v`` reaches ``o`` unchanged), and consumers with biases (OPT, BERT, GPT-2 and GPT-NeoX
  have them; Llama does not, and its groups get the scaling only);
- **scale**: ``s_j = max(1, r_j / t)`` with ``r_j = max |X_j - z_j|``: only channels whose range
  exceeds the threshold ``t`` are scaled down to it; their weights' input columns take ``s_j``.
  ``t`` is searched per group (the paper's "optimal scaling"): among ``grid`` thresholds, evenly
  spaced up to the largest range, the one whose W8A8 output error on the calibration tokens
  ``sum_i || Q_a((X - z) / s) Q_w(W_i s)^T - (X - z) W_i^T ||^2`` is smallest; or set as a fraction
  of the largest range (``threshold``).

The full-precision function is unchanged. Like SmoothQuant, a transform only: a later step
quantizes the weights (and, with ``input_activations``, their inputs). Post-LN encoders' norms feed
the residual too and are left alone (BERT's v -> o group is still shifted and scaled).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..formats import Quantizer
from ..models import is_linear, weight_of
from .base import EstimateInputs, Step, StepEstimate, register_step
from .folding import divide_producer_outputs, multiply_consumer_inputs
from .smoothquant import (
    ChannelStatistics,
    W8A8SearchConfig,
    foldable_groups,
    quantized_output_error,
    search_estimate,
    weight_spec,
)

log = logging.getLogger(__name__)


class OutlierSuppressionConfig(W8A8SearchConfig):
    """Outlier Suppression+ options (and the search's, :class:`~.smoothquant.W8A8SearchConfig`).

    Attributes:
        shift: centre each channel where the producer and every consumer have a bias.
        threshold: ``search`` (per group, the best of ``grid`` thresholds), or the threshold ``t``
            as a fraction of the group's largest channel range, in ``(0, 1]`` (1: no scaling).
        grid: thresholds tried by the search: ``i / grid`` of the largest range, ``i = 1 ... grid``.
    """

    shift: bool = True
    threshold: float | Literal["search"] = "search"
    grid: int = Field(20, ge=1)

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] or 'search', got {v}")
        return v


@register_step
class OutlierSuppression(Step):
    """Channel shift and scale of activation outliers, folded into the weights (needs calibration data)."""

    name = "os_plus"
    Config = OutlierSuppressionConfig
    needs_calibration = True

    def apply(self, unit) -> None:
        cfg: OutlierSuppressionConfig = self.config
        selected = unit.select(cfg)
        if not selected or not unit.has_calibration:
            return
        for group, names in foldable_groups(unit, selected):
            consumers = list(names.values())
            stats = ChannelStatistics.collect(unit, group, cfg.max_tokens, keep_tokens=cfg.threshold == "search")
            shift = cfg.shift and _can_shift(group, consumers)
            z = (stats.x_max + stats.x_min) / 2 if shift else torch.zeros_like(stats.x_max)
            ranges = (stats.x_max - z).abs().maximum((stats.x_min - z).abs())
            weights = [weight_of(m).detach().float() for m in consumers]
            if cfg.threshold == "search":
                t = self._search(stats, z, ranges, weights)
            else:
                t = float(cfg.threshold) * float(ranges.max())
            s = scaling_factors(ranges, t)
            if shift:
                fold_shift(group.prev, consumers, z)
            divide_producer_outputs(group.prev, s, unit.norm_offset)
            multiply_consumer_inputs(consumers, s)
            log.debug(
                "%s: OS+ %s: shift %s, threshold %.4g, %d channels scaled",
                unit.name,
                list(names),
                shift,
                t,
                int((s > 1).sum()),
            )

    @torch.no_grad()
    def _search(
        self, stats: ChannelStatistics, z: torch.Tensor, ranges: torch.Tensor, weights: list[torch.Tensor]
    ) -> float:
        cfg: OutlierSuppressionConfig = self.config
        device = weights[0].device
        x = torch.cat(stats.samples).to(device) - z.to(device)
        w_quantizer = Quantizer(weight_spec(cfg.search_weights))
        reference = [x @ w.T for w in weights]
        largest = float(ranges.max())
        best, best_err = largest, float("inf")
        for i in range(cfg.grid, 0, -1):  # from no scaling down: ties keep the milder threshold
            t = largest * i / cfg.grid
            s = scaling_factors(ranges, t).to(device)
            err = quantized_output_error(
                x / s, [w * s for w in weights], reference, w_quantizer, cfg.search_activations
            )
            if err < best_err:
                best, best_err = t, err
        return best

    def estimate(self, inputs: EstimateInputs) -> StepEstimate:
        """One partial block pass per group to collect its inputs; the search multiplies
        ``max_tokens`` inputs by every layer's quantized weight for each threshold."""
        cfg: OutlierSuppressionConfig = self.config
        return search_estimate(inputs, cfg.max_tokens, cfg.grid if cfg.threshold == "search" else 0)


def scaling_factors(ranges: torch.Tensor, threshold: float) -> torch.Tensor:
    """``s_j = max(1, r_j / t)``: channels within the threshold keep their scale."""
    return (ranges.float() / max(threshold, 1e-12)).clamp(min=1.0)


def _can_shift(group, consumers: list) -> bool:
    """The shift folds into the producer's bias and every consumer's bias."""
    if any(getattr(m, "bias", None) is None for m in consumers):
        return False
    if is_linear(group.prev):
        return group.shift_passes and getattr(group.prev, "bias", None) is not None
    return isinstance(getattr(group.prev, "bias", None), torch.Tensor)


@torch.no_grad()
def fold_shift(prev, consumers: list, z: torch.Tensor) -> None:
    """Subtract ``z`` from the producer's output (its bias) and add ``W z`` to every consumer's bias."""
    z = z.detach().float()
    for lin in consumers:
        w = weight_of(lin).detach().float()
        lin.bias.copy_((lin.bias.float() + w @ z.to(w.device)).to(lin.bias.dtype))
    bias = prev.bias
    bias.copy_((bias.float() - z.to(bias.device)).to(bias.dtype))
