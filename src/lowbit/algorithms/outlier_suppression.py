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
from ..formats.activations import ActivationScheme, random_rows
from ..models import is_linear, weight_of
from .base import EstimateInputs, Step, StepConfig, StepEstimate, register_step
from .folding import divide_producer_outputs, multiply_consumer_inputs
from .smoothquant import quantized_output_error, weight_spec

log = logging.getLogger(__name__)


class OutlierSuppressionConfig(StepConfig):
    """Outlier Suppression+ options.

    Attributes:
        shift: centre each channel where the producer and every consumer have a bias.
        threshold: ``search`` (per group, the best of ``grid`` thresholds), or the threshold ``t``
            as a fraction of the group's largest channel range, in ``(0, 1]`` (1: no scaling).
        grid: thresholds tried by the search: ``i / grid`` of the largest range, ``i = 1 ... grid``.
        search_weights: the weight format of the search (default INT8 per output channel).
        search_activations: the activation scheme of the search (default INT8, one static scale
            per tensor).
        max_tokens: calibration tokens kept per group for the search (a seeded random subset; the
            channel ranges use every token).
    """

    shift: bool = True
    threshold: float | Literal["search"] = "search"
    grid: int = Field(20, ge=1)
    search_weights: str | dict = Field(default_factory=lambda: {"format": "int8", "granularity": "channel"})
    search_activations: ActivationScheme = Field(default_factory=lambda: ActivationScheme(format="int8", dynamic=False))
    max_tokens: int = Field(4096, ge=16)

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] or 'search', got {v}")
        return v

    @field_validator("search_weights")
    @classmethod
    def _weights(cls, v: str | dict) -> str | dict:
        weight_spec(v)  # raises with the reason
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
        fraction = min(1.0, cfg.max_tokens / max(1, unit.inputs.tokens()))
        for group in unit.groups:
            names = {unit.full_name(rel): m for rel, m in group.linears.items()}
            if group.prev is None or not all(n in selected for n in names):
                continue
            consumers = list(names.values())
            stats = _ChannelRanges(fraction, keep_tokens=cfg.threshold == "search")
            unit.collect({"_": consumers[0]}, lambda _n, x, stats=stats: stats.add(x))
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
        self, stats: _ChannelRanges, z: torch.Tensor, ranges: torch.Tensor, weights: list[torch.Tensor]
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
        tokens = min(cfg.max_tokens, inputs.calibration_tokens)
        flops = 0.0
        memory = 2 * 4 * inputs.largest
        if cfg.threshold == "search":
            flops = sum(2 * cfg.grid * 2 * tokens * r * c for r, c in inputs.layers.values())
            memory += 3 * 4 * tokens * max((r for r, _ in inputs.layers.values()), default=0)
        return StepEstimate(memory_bytes=memory, block_passes=1.0, flops=flops)


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


class _ChannelRanges:
    """Per-channel minimum and maximum over all calibration tokens, and (for the search) a seeded
    random ``fraction`` of the tokens themselves."""

    def __init__(self, fraction: float, keep_tokens: bool, seed: int = 0):
        self.x_max: torch.Tensor | None = None
        self.x_min: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.fraction = fraction
        self.keep_tokens = keep_tokens
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        hi, lo = x.amax(0), x.amin(0)
        self.x_max = hi if self.x_max is None else torch.maximum(self.x_max, hi)
        self.x_min = lo if self.x_min is None else torch.minimum(self.x_min, lo)
        if self.keep_tokens:
            self.samples.append(random_rows(x, self.fraction, self.generator))
