"""AWQ (Lin et al., 2024): activation-aware per-channel scaling, then clipping, then rounding.

For each group of linears that read one input (q/k/v after the attention norm, gate/up after the
MLP norm, o after v, down after up, where shapes allow), search ``alpha`` on a grid for the scales
``s = mean|x|^alpha`` (optionally divided by ``mean|w|^(1-alpha)``, AutoAWQ's "duo" scaling) that
minimise the error of the group's output with quantized ``W*s`` on inputs ``x/s``; fold ``1/s`` into
the producer so the full-precision function is unchanged; then search a clipping range per
weight group that minimises the output error; then round (unless a later step quantizes).
"""

from __future__ import annotations

import logging
import time

import torch
from pydantic import Field
from torch import nn

from ..formats import QParams, Quantizer
from ..models import set_weight, weight_of
from ..pipeline.tensors import first_tensor, to_device
from .base import Step, WeightQuantConfig, match_name, register_step
from .folding import divide_producer_outputs, multiply_consumer_inputs
from .hessian import output_error

log = logging.getLogger(__name__)


class AWQConfig(WeightQuantConfig):
    """AWQ options (besides the format).

    Attributes:
        grid: number of ``alpha`` values tried in ``[0, 1)``.
        duo_scaling: divide by ``mean|w|^(1-alpha)`` as well (AutoAWQ's default); ``False`` is the
            paper's ``s = mean|x|^alpha``.
        clip_search: search a clipping range per weight group after scaling.
        clip_grid, clip_max_shrink: clip ratios tried, from 1 down to ``1 - clip_max_shrink``.
        clip_skip: layer-name patterns whose weights are not clipped (query/key projections,
            whose errors the softmax amplifies).
        max_tokens: calibration tokens used per group for the searches (subsampled, seeded).
        quantize: round the weights after scaling and clipping. ``False`` (or a later quantizer
            step on the same layers, e.g. AWQ then GPTQ) leaves them in full precision.
    """

    grid: int = Field(20, ge=1)
    duo_scaling: bool = True
    clip_search: bool = True
    clip_grid: int = Field(20, ge=1)
    clip_max_shrink: float = Field(0.5, gt=0.0, lt=1.0)
    clip_skip: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "query", "key"])
    max_tokens: int = Field(65536, ge=16)
    quantize: bool = True


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
        for group in groups:
            names = {unit.full_name(rel): m for rel, m in group.linears.items()}
            if not any(n in selected for n in names):
                continue
            first = next(iter(group.linears.values()))
            xs = _subsample(unit.capture_inputs(first), cfg.max_tokens)
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).float()
            H = _hessian(x)
            originals = {n: weight_of(m).detach().float().clone() for n, m in names.items()}
            s = torch.ones(x.shape[-1], device=x.device)
            if group.prev is not None:
                s = self._search_scales(unit, group, names, selected, x, quantizer)
                divide_producer_outputs(group.prev, s, unit.norm_offset)
                multiply_consumer_inputs(list(names.values()), s)
            for n, m in names.items():
                if n not in selected:
                    continue
                if cfg.clip_search and not any(match_name(n, p) for p in cfg.clip_skip):
                    self._clip(m, x / s, quantizer)
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

    # ------------------------------------------------------------------ scale search
    @torch.no_grad()
    def _search_scales(self, unit, group, names: dict[str, nn.Module], selected, x: torch.Tensor, quantizer: Quantizer):
        cfg: AWQConfig = self.config
        modules = list(names.values())
        weights = [weight_of(m).detach().float().clone() for m in modules]
        x_mean = x.abs().mean(0)
        w_mean = _normalised_weight_mean(torch.cat(weights), quantizer)
        evaluate = self._group_output_fn(unit, group, modules, x)
        reference = evaluate()
        best, best_err, best_s = None, float("inf"), None
        for step in range(cfg.grid):
            alpha = step / cfg.grid
            if cfg.duo_scaling:
                s = x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp(min=1e-4)
            else:
                s = x_mean.pow(alpha)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for m, w, n in zip(modules, weights, names):
                q = quantizer.dequantize(quantizer.quantize(w * s)) if n in selected else w * s
                set_weight(m, q / s)
            err = float(sum((a - b).float().pow(2).mean() for a, b in zip(evaluate(), reference)))
            if err < best_err:
                best, best_err, best_s = alpha, err, s.clone()
        for m, w in zip(modules, weights):
            set_weight(m, w)
        log.debug("%s: AWQ alpha %.2f for %s", unit.name, best, list(names))
        return best_s

    def _group_output_fn(self, unit, group, modules: list[nn.Module], x: torch.Tensor):
        """Outputs that measure the group's error: the inspect module's (e.g. the whole attention)
        or, without one, the group's own linears on the captured inputs."""
        if group.inspect is not None:
            calls = _subsample_calls(unit.capture_calls(group.inspect), self.config.max_tokens)
            device = unit.device

            def run_inspect():
                return [first_tensor(group.inspect(*to_device(a, device), **to_device(k, device))) for a, k in calls]

            return run_inspect

        # x is float32 (for the statistics); the layers compute in their own dtype, as in the model
        by_dtype = {dtype: x.to(dtype) for dtype in {weight_of(m).dtype for m in modules}}

        def run_linears():
            return [m(by_dtype[weight_of(m).dtype]) for m in modules]

        return run_linears

    # ------------------------------------------------------------------ clipping
    @torch.no_grad()
    def _clip(self, module: nn.Module, x: torch.Tensor, quantizer: Quantizer) -> None:
        """Per weight group, the clip ratio that minimises the output error on inputs ``x``."""
        cfg: AWQConfig = self.config
        w = weight_of(module).detach().float()
        wg = quantizer.group_view(w)  # [rows, G, S]
        rows, G, S = wg.shape
        if quantizer.spec.granularity == "tensor":
            return
        xg = x.reshape(-1, G, S)
        C = torch.einsum("tgk,tgl->gkl", xg, xg) / xg.shape[0]  # per-group input covariance
        gscale = quantizer.global_scale_for(w)
        amax = wg.abs().amax(-1, keepdim=True)
        best_err = torch.full((rows, G), float("inf"), device=w.device)
        best_max = amax.clone()
        for i in range(cfg.clip_grid):
            ratio = 1 - cfg.clip_max_shrink * i / cfg.clip_grid
            lim = amax * ratio
            clipped = torch.clamp(wg, -lim, lim)
            p: QParams = quantizer.compute_params(clipped, 1.0, gscale)
            delta = wg - quantizer.decode(quantizer.encode(clipped, p), p)
            err = torch.einsum("rgk,gkl,rgl->rg", delta, C, delta)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[..., None], lim, best_max)
        clipped = torch.clamp(wg, -best_max, best_max).reshape(w.shape)
        set_weight(module, clipped)


def _normalised_weight_mean(w: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
    """Mean over output rows of |w| normalised by each weight group's absmax (AutoAWQ's w_mean)."""
    wg = quantizer.group_view(w) if quantizer.spec.granularity == "group" else w.unsqueeze(1)
    scaled = wg.abs() / wg.abs().amax(-1, keepdim=True).clamp(min=1e-8)
    return scaled.reshape(w.shape).mean(0)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x.T @ x / max(1, x.shape[0])


def _subsample(xs: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    flat = [t.reshape(-1, t.shape[-1]) for t in xs]
    total = sum(t.shape[0] for t in flat)
    if total <= max_tokens:
        return flat
    x = torch.cat(flat)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(total, generator=gen)[:max_tokens].to(x.device)
    return [x[idx]]


def _subsample_calls(calls: list, max_tokens: int) -> list:
    """Keep whole calls (sequences) until about ``max_tokens`` tokens."""
    out, used = [], 0
    for a, k in calls:
        h = a[0] if a else next(iter(v for v in k.values() if isinstance(v, torch.Tensor)))
        out.append((a, k))
        used += h.numel() // h.shape[-1]
        if used >= max_tokens:
            break
    return out
