"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

For each group of linears that read one input ``X`` produced by a norm or a linear (q/k/v after the
attention norm, gate/up after the MLP norm, o after v and down after up where shapes allow), the
per-input-channel smoothing factor is

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(``max|W_j|`` over every output row of every linear in the group). The producer's output channel
``j`` is divided by ``s_j`` and every consumer's input column ``j`` multiplied by it: the
full-precision function is unchanged, the activations lose their outlier channels and the weights
take part of them. ``alpha`` is one value for the model (the paper: 0.5 for most models), or
searched per group (``alpha: search``) as the value whose W8A8 output error on the calibration
tokens is smallest: ``|| X W^T - Q_a(X / s) Q_w(W s)^T ||^2`` summed over the group's linears.

Groups whose input cannot be rescaled by folding (post-LN encoders such as BERT: the norm before
q/k/v also feeds the residual) are left alone. SmoothQuant only transforms weights: a later step
quantizes them and (with ``input_activations``) their inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..formats import FormatSpec, Quantizer, make_format
from ..formats.activations import ActivationScheme, StaticObserver, random_rows
from ..models import is_linear, weight_of
from ..models.adapter import ResolvedGroup
from .base import EstimateInputs, Step, StepConfig, StepEstimate, register_step
from .folding import divide_producer_outputs, multiply_consumer_inputs

log = logging.getLogger(__name__)


class W8A8SearchConfig(StepConfig):
    """Options shared by the steps that move activation outliers into the weights and search their
    factors on the quantized output error (SmoothQuant, Outlier Suppression+).

    Attributes:
        search_weights: the weight format the search quantizes with (a format name or mapping;
            default INT8 per output channel).
        search_activations: the activation scheme the search quantizes with (default INT8 with
            one static scale per tensor, where outlier channels hurt most).
        max_tokens: calibration tokens kept per group for the search (a seeded random subset).
    """

    search_weights: str | dict = Field(default_factory=lambda: {"format": "int8", "granularity": "channel"})
    search_activations: ActivationScheme = Field(default_factory=lambda: ActivationScheme(format="int8", dynamic=False))
    max_tokens: int = Field(4096, ge=16)

    @field_validator("search_weights")
    @classmethod
    def _weights(cls, v: str | dict) -> str | dict:
        weight_spec(v)  # raises with the reason
        return v


class SmoothQuantConfig(W8A8SearchConfig):
    """SmoothQuant options (and the search's, :class:`W8A8SearchConfig`).

    Attributes:
        alpha: the migration strength in ``[0, 1]`` (0: nothing moves, 1: all of the activation
            range moves into the weights), or ``search``: per group, the best of ``grid`` values.
        grid: alphas tried by the search, ``i / grid`` for ``i = 0 ... grid``.
        producers: ``all`` smooths every group whose producer is a norm or a linear; ``norms``
            only those after a norm (the paper's placement for OPT/BLOOM).
    """

    alpha: float | Literal["search"] = 0.5
    grid: int = Field(20, ge=1)
    producers: Literal["all", "norms"] = "all"

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or 'search', got {v}")
        return v


def weight_spec(v: str | dict) -> FormatSpec:
    if isinstance(v, str):
        return make_format(v, group_size=-1)
    data = dict(v)
    fmt = data.pop("format", "int8")
    granularity = data.pop("granularity", None)
    if granularity == "channel":
        data["group_size"] = -1
    return make_format(fmt, **data)


@register_step
class SmoothQuant(Step):
    """Per-channel smoothing of activation outliers into the weights (needs calibration data)."""

    name = "smoothquant"
    Config = SmoothQuantConfig
    needs_calibration = True

    def apply(self, unit) -> None:
        cfg: SmoothQuantConfig = self.config
        selected = unit.select(cfg)
        if not selected or not unit.has_calibration:
            return
        for group, names in foldable_groups(unit, selected):
            if cfg.producers == "norms" and is_linear(group.prev):
                continue
            stats = ChannelStatistics.collect(unit, group, cfg.max_tokens, keep_tokens=cfg.alpha == "search")
            weights = [weight_of(m).detach().float() for m in names.values()]
            w_max = torch.cat(weights).abs().amax(0)
            if cfg.alpha == "search":
                alpha = self._search(stats, weights, w_max)
            else:
                alpha = float(cfg.alpha)
            s = smoothing_factors(stats.abs_max.to(w_max.device), w_max, alpha)
            divide_producer_outputs(group.prev, s, unit.norm_offset)
            multiply_consumer_inputs(list(names.values()), s)
            log.debug("%s: SmoothQuant alpha %.2f for %s", unit.name, alpha, list(names))

    @torch.no_grad()
    def _search(self, stats: ChannelStatistics, weights: list[torch.Tensor], w_max: torch.Tensor) -> float:
        cfg: SmoothQuantConfig = self.config
        x = torch.cat(stats.samples).to(w_max.device)
        w_quantizer = Quantizer(weight_spec(cfg.search_weights))
        reference = [x @ w.T for w in weights]
        best, best_err = 0.0, float("inf")
        for i in range(cfg.grid + 1):
            alpha = i / cfg.grid
            s = smoothing_factors(stats.abs_max.to(w_max.device), w_max, alpha)
            err = quantized_output_error(
                x / s, [w * s for w in weights], reference, w_quantizer, cfg.search_activations
            )
            if err < best_err:
                best, best_err = alpha, err
        return best

    def estimate(self, inputs: EstimateInputs) -> StepEstimate:
        """One partial block pass to collect the inputs; the search multiplies ``max_tokens`` inputs
        by every layer's quantized weight for each alpha."""
        cfg: SmoothQuantConfig = self.config
        return search_estimate(inputs, cfg.max_tokens, cfg.grid + 1 if cfg.alpha == "search" else 0)


def search_estimate(inputs: EstimateInputs, max_tokens: int, candidates: int) -> StepEstimate:
    """Memory and time of a step that collects each group's inputs in one partial block pass and
    tries ``candidates`` factors on ``max_tokens`` of them (0: no search)."""
    tokens = min(max_tokens, inputs.calibration_tokens)
    flops = 0.0
    memory = 2 * 4 * inputs.largest
    if candidates:
        flops = sum(2 * candidates * 2 * tokens * r * c for r, c in inputs.layers.values())
        memory += 3 * 4 * tokens * max((r for r, _ in inputs.layers.values()), default=0)
    return StepEstimate(memory_bytes=memory, block_passes=1.0, flops=flops)


def foldable_groups(unit, selected: dict) -> Iterator[tuple[ResolvedGroup, dict[str, nn.Module]]]:
    """The unit's groups whose producer takes a folded factor and whose linears are all selected,
    each with its linears by full name."""
    for group in unit.groups:
        names = {unit.full_name(rel): m for rel, m in group.linears.items()}
        if group.prev is not None and all(n in selected for n in names):
            yield group, names


def smoothing_factors(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; channels that are zero on either side keep 1
    (nothing to balance, and a zero would not fold)."""
    s = x_max.float().clamp(min=1e-5).pow(alpha) / w_max.float().clamp(min=1e-5).pow(1 - alpha)
    dead = (x_max <= 0) | (w_max <= 0)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=1e-5))


def quantized_output_error(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    reference: list[torch.Tensor],
    w_quantizer: Quantizer,
    scheme: ActivationScheme,
) -> float:
    """``sum_i || Q_a(x) Q_w(W_i)^T - reference_i ||^2``: a group's output error with quantized
    weights and inputs (``x`` and ``W_i`` already transformed; ``reference_i`` the original outputs)."""
    xq = fake_quant_inputs(x, scheme)
    err = 0.0
    for w, ref in zip(weights, reference):
        wq = w_quantizer.dequantize(w_quantizer.quantize(w))
        err += float((xq @ wq.T - ref).pow(2).sum())
    return err


def fake_quant_inputs(x: torch.Tensor, scheme: ActivationScheme) -> torch.Tensor:
    from ..formats.activations import InputQuantizer

    quantizer = InputQuantizer(scheme)
    if scheme.dynamic:
        return quantizer(x)
    observer = StaticObserver(scheme)
    observer.add(x)
    return quantizer(x, observer.scale())


class ChannelStatistics:
    """Per input channel, the maximum and minimum over all calibration tokens, and (for a search) a
    seeded random ``fraction`` of the tokens themselves."""

    def __init__(self, fraction: float, keep_tokens: bool, seed: int = 0):
        self.x_max: torch.Tensor | None = None
        self.x_min: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []
        self.fraction = fraction
        self.keep_tokens = keep_tokens
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def collect(cls, unit, group: ResolvedGroup, max_tokens: int, keep_tokens: bool) -> ChannelStatistics:
        """The statistics of ``group``'s input over the unit's calibration data (at most ``max_tokens``
        tokens kept)."""
        stats = cls(min(1.0, max_tokens / max(1, unit.inputs.tokens())), keep_tokens)
        unit.collect({"_": next(iter(group.linears.values()))}, lambda _n, x: stats.add(x))
        return stats

    @property
    def abs_max(self) -> torch.Tensor:
        """``max|x_j|``."""
        return torch.maximum(self.x_max.abs(), self.x_min.abs())

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        hi, lo = x.amax(0), x.amin(0)
        self.x_max = hi if self.x_max is None else torch.maximum(self.x_max, hi)
        self.x_min = lo if self.x_min is None else torch.minimum(self.x_min, lo)
        if self.keep_tokens:
            self.samples.append(random_rows(x, self.fraction, self.generator))
