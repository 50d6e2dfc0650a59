"""AWQ (Lin et al., 2024): activation-aware per-channel scaling, then clipping, then rounding.

For each group of linears that read one input (q/k/v after the attention norm, gate/up after the
MLP norm, o after v, down after up, where shapes allow), search ``alpha`` on a grid for the scales
``s = mean|x|^alpha`` (optionally divided by ``mean|w|^(1-alpha)``, AutoAWQ's "duo" scaling) that
minimise the error of the group's output with quantized ``W*s`` on inputs ``x/s``; fold ``1/s`` into
the producer so the full-precision function is unchanged; then search a clipping range per
weight group that minimises the output error; then round (unless a later step quantizes).

Two objectives for the scale search (``objective``):

- ``layer`` (default), the paper's equation 4: the error of each linear's own output,
  ``sum_l ||X W_l^T - (X/s) Q(W_l s)^T||^2``. It is a quadratic form in the input covariance
  ``H = X^T X``: ``sum_l tr(D_l H D_l^T)`` with ``D_l = W_l - Q(W_l s)/s``. The search then needs
  no pass over tokens; ``H`` is accumulated once while the inputs are collected, and the grid
  is evaluated in batches of ``alpha``.
- ``module``: what llm-awq and AutoAWQ measure, the output of the whole module the linears feed
  (the attention for q/k/v, the MLP for gate/up), run on ``module_tokens`` calibration tokens for
  every grid point. Groups without such a module (o_proj, down_proj) use the closed form, which
  is then exactly that objective.

The clip search always uses the closed form (per weight group, the covariance of that group's
inputs, a block of ``H``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..formats import QParams, Quantizer
from ..formats.activations import random_rows
from ..models import set_weight, weight_of
from ..pipeline.tensors import first_tensor, to_device
from .base import EstimateInputs, Step, StepEstimate, WeightQuantConfig, match_name, register_step
from .folding import divide_producer_outputs, multiply_consumer_inputs
from .hessian import Hessian, HessianAccumulator, diagonal_blocks, hessian_nbytes, output_error

log = logging.getLogger(__name__)


class AWQConfig(WeightQuantConfig):
    """AWQ options (besides the format).

    Attributes:
        grid: number of ``alpha`` values tried in ``[0, 1)``: ``i / grid``.
        duo_scaling: divide by ``mean|w|^(1-alpha)`` as well (AutoAWQ's default); ``False`` is the
            paper's ``s = mean|x|^alpha``.
        objective: ``layer`` (the paper's per-linear output error, in closed form) or ``module``
            (llm-awq's and AutoAWQ's: the output of the attention or MLP the group feeds, run on
            ``module_tokens`` tokens per grid point); see the module docstring.
        module_tokens: calibration tokens (whole sequences) the ``module`` objective runs.
        clip_search: search a clipping range per weight group after scaling.
        clip_grid, clip_max_shrink: the clip ratios tried, as ``clip_grid_style`` spreads them.
        clip_grid_style: ``fine`` (lowbit's): ``clip_grid`` ratios ``1 - clip_max_shrink * i /
            clip_grid``, 1.0 ... 0.525 with the defaults; ``autoawq`` (llm-awq's and AutoAWQ's):
            ``1 - i / clip_grid`` for ``i < clip_max_shrink * clip_grid``, ten ratios 1.0 ... 0.55.
        clip_skip: layer-name patterns whose weights are not clipped (query/key projections,
            whose errors the softmax amplifies).
        max_tokens: calibration tokens the statistics (``H``, ``mean|x|``) are taken from
            (a seeded random subset when there are more).
        quantize: round the weights after scaling and clipping. ``False`` (or a later quantizer
            step on the same layers, e.g. AWQ then GPTQ) leaves them in full precision.
    """

    grid: int = Field(20, ge=1)
    duo_scaling: bool = True
    objective: Literal["layer", "module"] = "layer"
    module_tokens: int = Field(4096, ge=1)
    clip_search: bool = True
    clip_grid: int = Field(20, ge=1)
    clip_max_shrink: float = Field(0.5, gt=0.0, lt=1.0)
    clip_grid_style: Literal["fine", "autoawq"] = "fine"
    clip_skip: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "query", "key"])
    max_tokens: int = Field(65536, ge=16)
    quantize: bool = True

    def clip_ratios(self) -> list[float]:
        if self.clip_grid_style == "autoawq":
            return [1 - i / self.clip_grid for i in range(max(1, int(self.clip_max_shrink * self.clip_grid)))]
        return [1 - self.clip_max_shrink * i / self.clip_grid for i in range(self.clip_grid)]


class _InputStatistics:
    """``H = 2/n X^T X`` and ``mean|x|`` of a group's input, accumulated batch by batch from a
    seeded random ``fraction`` of the tokens (no copy of the activations is kept)."""

    def __init__(self, columns: int, device: torch.device, fraction: float, seed: int = 0):
        self.hessian = HessianAccumulator(columns, device)
        self.abs_sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.fraction = fraction
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = random_rows(x.detach().reshape(-1, x.shape[-1]), self.fraction, self.generator)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.hessian.add(x)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(1, self.hessian.tokens)).float()


@register_step
class AWQ(Step):
    """Activation-aware weight quantization (needs calibration data)."""

    name = "awq"
    Config = AWQConfig
    needs_calibration = True
    quantizes_weights = True  # unless a later step of the recipe quantizes the same layers

    def apply(self, unit) -> None:
        cfg: AWQConfig = self.config
        quantizer = Quantizer(cfg.spec)
        selected = unit.select(cfg)
        if not selected:
            return
        if not unit.has_calibration:
            log.warning("%s: AWQ has no calibration inputs here; layers are only rounded", unit.name or "head")
        start = time.perf_counter()
        records: dict[str, dict] = {}
        groups = unit.groups if unit.has_calibration else []
        fraction = min(1.0, cfg.max_tokens / max(1, unit.inputs.tokens())) if unit.has_calibration else 1.0
        for group in groups:
            names = {unit.full_name(rel): m for rel, m in group.linears.items()}
            if not any(n in selected for n in names):
                continue
            first = next(iter(group.linears.values()))
            stats = _InputStatistics(weight_of(first).shape[1], unit.device, fraction)
            unit.collect({"_": first}, lambda _n, x, stats=stats: stats.add(x))
            H = stats.hessian.H
            originals = {n: weight_of(m).detach().float().clone() for n, m in names.items()}
            s = torch.ones(H.shape[0], device=unit.device)
            if group.prev is not None:
                s = self._search_scales(unit, group, names, selected, stats.mean_abs, H, quantizer)
                divide_producer_outputs(group.prev, s, unit.norm_offset)
                multiply_consumer_inputs(list(names.values()), s)
            for n, m in names.items():
                if n not in selected:
                    continue
                if cfg.clip_search and not any(match_name(n, p) for p in cfg.clip_skip):
                    clip_to_output_error(m, H, s, quantizer, cfg.clip_ratios())
                records[n] = {"H": H, "orig": originals[n], "s": s}
        if self.followed_by_quantizer or not cfg.quantize:
            log.info("%s: AWQ scaled/clipped %d layers without rounding them", unit.name, len(records))
            return
        per_layer = (time.perf_counter() - start) / max(1, len(selected))
        for n, m in selected.items():
            t0 = time.perf_counter()
            qt = quantizer.quantize(weight_of(m).detach().float())
            err = err_rtn = None
            if n in records:  # errors measured in the original input space, against plain RTN
                r = records[n]
                base = max(output_error(r["orig"], r["H"]), 1e-30)
                effective = quantizer.dequantize(qt).to(r["s"].device) / r["s"]
                err = output_error(r["orig"] - effective, r["H"]) / base
                err_rtn = output_error(r["orig"] - quantizer.dequantize(quantizer.quantize(r["orig"])), r["H"]) / base
            unit.commit(
                n,
                m,
                qt,
                self.name,
                seconds=per_layer + time.perf_counter() - t0,
                output_error=err,
                output_error_rtn=err_rtn,
            )

    def estimate(self, inputs: EstimateInputs) -> StepEstimate:
        """The widest group's input covariance, a batch of candidate weights (``layer_output_errors``
        keeps it near 256 MiB) and the layers' original weights for the report; one partial block
        pass to collect the inputs, and ``grid`` runs of the attention/MLP on ``module_tokens`` tokens
        with the ``module`` objective; the closed-form grid and the clip search."""
        cfg: AWQConfig = self.config
        largest = inputs.largest
        memory = hessian_nbytes(inputs.widest_input, inputs.device) + min(256 * 2**20, 12 * largest * cfg.grid)
        memory += 2 * 4 * largest
        passes = 1.0
        if cfg.objective == "module":
            passes += cfg.grid * min(1.0, cfg.module_tokens / max(1, inputs.calibration_tokens))
        group = cfg.spec.group_size or 1
        flops = sum(
            2 * cfg.grid * rows * cols**2 + 2 * len(cfg.clip_ratios()) * rows * cols * group
            for rows, cols in inputs.layers.values()
        )
        return StepEstimate(memory_bytes=memory, block_passes=passes, flops=flops)

    # ------------------------------------------------------------------ scale search
    @torch.no_grad()
    def _search_scales(
        self, unit, group, names: dict[str, nn.Module], selected, x_mean: torch.Tensor, H: Hessian, quantizer
    ) -> torch.Tensor:
        cfg: AWQConfig = self.config
        modules = list(names.values())
        weights = [weight_of(m).detach().float() for m in modules]
        candidates = awq_candidate_scales(x_mean, torch.cat(weights), quantizer, cfg.grid, cfg.duo_scaling)
        if cfg.objective == "module" and group.inspect is not None:
            errors = self._module_errors(unit, group, modules, weights, [n in selected for n in names], candidates)
        else:
            errors = layer_output_errors(weights, [n in selected for n in names], H, candidates, quantizer)
        best = int(torch.argmin(errors))
        log.debug("%s: AWQ alpha %.2f for %s", unit.name, best / cfg.grid, list(names))
        return candidates[best]

    def _module_errors(self, unit, group, modules, weights, rounded, candidates: torch.Tensor) -> torch.Tensor:
        """For each candidate scale, the squared error of the inspect module's output (llm-awq's
        objective), on ``module_tokens`` tokens."""
        calls = _first_calls(unit.capture_calls(group.inspect), self.config.module_tokens)
        device = unit.device
        quantizer = Quantizer(self.config.spec)

        def run():
            return [first_tensor(group.inspect(*to_device(a, device), **to_device(k, device))) for a, k in calls]

        reference = run()
        weights = [w.clone() for w in weights]  # the layers' own tensors are overwritten below
        errors = torch.empty(len(candidates), dtype=torch.float64)
        for i, s in enumerate(candidates):
            for m, w, r in zip(modules, weights, rounded):
                q = quantizer.dequantize(quantizer.quantize(w * s)) if r else w * s
                set_weight(m, q / s)
            errors[i] = sum(float((a - b).float().pow(2).sum()) for a, b in zip(run(), reference))
        for m, w in zip(modules, weights):
            set_weight(m, w)
        return errors


def awq_candidate_scales(
    x_mean: torch.Tensor, w: torch.Tensor, quantizer: Quantizer, grid: int, duo_scaling: bool
) -> torch.Tensor:
    """The ``grid`` candidate scale vectors ``[grid, in]``, for ``alpha = i / grid``, normalised so
    that ``max(s) * min(s) = 1`` (as AutoAWQ does)."""
    w_mean = _normalised_weight_mean(w, quantizer)
    out = []
    for step in range(grid):
        alpha = step / grid
        s = x_mean.pow(alpha)
        if duo_scaling:
            s = s / w_mean.pow(1 - alpha).clamp(min=1e-4)
        s = s.clamp(min=1e-4)
        out.append(s / (s.max() * s.min()).sqrt())
    return torch.stack(out)


@torch.no_grad()
def layer_output_errors(
    weights: list[torch.Tensor],
    rounded: list[bool],
    H: Hessian,
    candidates: torch.Tensor,
    quantizer: Quantizer,
    budget_mib: float = 256.0,
) -> torch.Tensor:
    """``sum_l tr(D_l H D_l^T)`` with ``D_l = W_l - Q(W_l s)/s`` for every candidate ``s`` (a row
    of ``candidates``): the summed squared output error of the group's linears on the inputs
    ``H`` was accumulated from. Linears not ``rounded`` (not targeted) contribute nothing.
    Candidates are evaluated in batches whose float32 working set stays near ``budget_mib``."""
    errors = torch.zeros(len(candidates), dtype=torch.float64)
    for w, r in zip(weights, rounded):
        if not r:
            continue
        rows, cols = w.shape
        per_candidate = 3 * rows * cols * 4
        batch = 1 if quantizer.spec.global_scale else max(1, int(budget_mib * 2**20) // per_candidate)
        for a in range(0, len(candidates), batch):
            s = candidates[a : a + batch].to(w.device)  # [k, in]
            scaled = (w[None] * s[:, None, :]).reshape(-1, cols)
            delta = quantizer.dequantize(quantizer.quantize(scaled)).reshape(len(s), rows, cols)
            delta.div_(s[:, None, :]).sub_(w).neg_()  # W - Q(W s)/s
            for i in range(len(s)):
                errors[a + i] += output_error(delta[i], H)
    return errors


@torch.no_grad()
def clip_to_output_error(
    module: nn.Module, H: Hessian, s: torch.Tensor, quantizer: Quantizer, ratios: list[float]
) -> None:
    """Per weight group, the clip ratio (of the group's absmax) that minimises the output error on
    the inputs ``x / s`` (their per-group covariance is a diagonal block of ``H`` scaled by ``1/s``)."""
    w = weight_of(module).detach().float()
    if quantizer.spec.granularity == "tensor":
        return
    wg = quantizer.group_view(w)  # [rows, G, S]
    rows, G, S = wg.shape
    inv = (1.0 / s).reshape(G, S)
    C = diagonal_blocks(H, S).to(w.device) * inv[:, :, None] * inv[:, None, :]  # [G, S, S]
    gscale = quantizer.global_scale_for(w)
    amax = wg.abs().amax(-1, keepdim=True)
    best_err = torch.full((rows, G), float("inf"), device=w.device)
    best_max = amax.clone()
    for ratio in ratios:
        lim = amax * ratio
        clipped = torch.clamp(wg, -lim, lim)
        p: QParams = quantizer.compute_params(clipped, 1.0, gscale)
        delta = wg - quantizer.decode(quantizer.encode(clipped, p), p)
        err = torch.einsum("rgk,gkl,rgl->rg", delta, C, delta)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better[..., None], lim, best_max)
    set_weight(module, torch.clamp(wg, -best_max, best_max).reshape(w.shape))


def _normalised_weight_mean(w: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
    """Mean over output rows of |w| normalised by each weight group's absmax (AutoAWQ's w_mean)."""
    wg = quantizer.group_view(w) if quantizer.spec.granularity == "group" else w.unsqueeze(1)
    scaled = wg.abs() / wg.abs().amax(-1, keepdim=True).clamp(min=1e-8)
    return scaled.reshape(w.shape).mean(0)


def _first_calls(calls: list, max_tokens: int) -> list:
    """Whole calls (batches of sequences, in calibration order: seeded random windows) until about
    ``max_tokens`` tokens."""
    out, used = [], 0
    for a, k in calls:
        h = a[0] if a else next(iter(v for v in k.values() if isinstance(v, torch.Tensor)))
        out.append((a, k))
        used += math.prod(h.shape[:-1])
        if used >= max_tokens:
            break
    return out
