"""Quantize, dequantize and fake-quantize tensors in any :class:`FormatSpec`.

Every format is handled the same way: the tensor is viewed as ``[rows, groups, group_size]``,
each group gets parameters (scale, optional zero-point or min, optional per-tensor global scale or
per-super-block super-scale) and the elements become unsigned integer codes on the format's grid.
Algorithms that choose codes themselves (GPTQ, HQQ, AWQ) use :meth:`Quantizer.compute_params`,
:meth:`Quantizer.encode` and :meth:`Quantizer.decode` directly.
"""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import torch

from .grids import TableGrid, fp_emax, table_for
from .qtensor import QParams, QuantizedTensor
from .spec import INT_CODE_RANGE, SUPER_SCALE_BITS, FormatError, FormatSpec

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = ["FormatError", "QParams", "QuantizedTensor", "Quantizer", "check_finite"]


class Quantizer:
    """Quantizer for one :class:`FormatSpec`."""

    def __init__(self, spec: FormatSpec):
        self.spec = spec
        self.qmax = (1 << spec.bits) - 1
        self.table: TableGrid | None = None if spec.kind == "int" else table_for(spec)
        # Only these can meet a zero scale (an integer sub-block scale of 0, llama.cpp's d = 0 for an
        # all-zero block, an unrounded ideal): their codes are then fixed, not x / 0.
        self._zero_scales = spec.super_block is not None or spec.zero_style == "min" or spec.clip == "llama.cpp"

    # ------------------------------------------------------------------ shapes
    def group_size_for(self, cols: int, shape: tuple[int, ...] | None = None) -> int:
        s = self.spec
        if s.granularity == "group":
            block = s.super_block or s.group_size
            if cols % block != 0:
                raise FormatError(self._shape_message(cols, block, shape))
            return s.group_size
        return cols

    def _shape_message(self, cols: int, block: int, shape: tuple[int, ...] | None) -> str:
        s = self.spec
        if s.super_block is None and not (s.name and s.name == s.ggml_type):
            return (
                f"group_size {s.group_size} does not divide the input dimension {cols}; "
                f"choose a group size that divides {cols}"
            )
        what = f"shape {tuple(shape)}" if shape is not None else "a tensor"
        kind = "super-blocks" if s.super_block else "blocks"
        return (
            f"{s.label()} quantizes {kind} of {block} elements along the input (last) dimension; "
            f"{what} has {cols} there, not a multiple of {block}"
        )

    def check_shape(self, shape: tuple[int, ...] | torch.Size) -> None:
        """Raise :class:`FormatError` (naming the shape and the block) if rows do not split into blocks."""
        if self.spec.granularity == "group":
            self.group_size_for(shape[-1] if len(shape) else 1, tuple(shape))

    def param_block(self, cols: int) -> int | None:
        """Columns whose parameters are chosen together: a super-block (one super-scale for all its
        groups), else a group; ``None`` for per-channel/per-tensor parameters."""
        if self.spec.granularity != "group":
            return None
        return self.spec.super_block or self.group_size_for(cols)

    def as_2d(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 0:
            return x.reshape(1, 1)
        if x.ndim == 1:
            return x.reshape(1, -1)
        return x.reshape(-1, x.shape[-1])

    def group_view(self, x2d: torch.Tensor) -> torch.Tensor:
        """``[rows, cols] -> [rows, groups, group_size]`` (a view when possible)."""
        rows, cols = x2d.shape
        if self.spec.granularity == "tensor":
            return x2d.reshape(1, 1, rows * cols)
        gs = self.group_size_for(cols, tuple(x2d.shape))
        return x2d.reshape(rows, cols // gs, gs)

    # ------------------------------------------------------------------ parameters
    def global_scale_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """NVFP4's per-tensor FP32 scale: maps the tensor absmax to (max e4m3) x (max element)."""
        if not self.spec.global_scale:
            return None
        amax = x.detach().abs().max().float()
        g = amax / (448.0 * self.table.max_abs)
        return torch.where(g > 0, g, torch.ones_like(g))

    def compute_params(
        self, xg: torch.Tensor, ratio: float | torch.Tensor = 1.0, global_scale: torch.Tensor | None = None
    ) -> QParams:
        """Parameters for groups ``xg`` (``[rows, groups, size]``), shrinking the range by ``ratio``.

        Formats with super-blocks need whole super-blocks in ``xg`` (consecutive runs of groups)."""
        s = self.spec
        x = xg.detach().float()
        if s.zero_style == "min" or s.super_block is not None:
            ideal = self.ideal_params(x, ratio)
            return self.store_params(ideal.scale, ideal.zero)
        if s.kind == "int" and not s.symmetric:
            xmin = torch.clamp(x.amin(-1, keepdim=True), max=0.0) * ratio
            xmax = torch.clamp(x.amax(-1, keepdim=True), min=0.0) * ratio
            scale = self.store_scale((xmax - xmin) / self.qmax, global_scale)
            zero = torch.clamp(torch.round(-xmin / self._apply_global(scale, global_scale)), 0, self.qmax)
            if s.zero_dtype != "int":
                zero = zero.to(_FLOAT_DTYPES[s.zero_dtype]).float()
            return QParams(scale, zero, global_scale)
        amax = x.abs().amax(-1, keepdim=True)
        if s.kind == "int":
            ideal = amax * ratio / (self.qmax / 2)
        elif s.kind == "binary":
            ideal = x.abs().mean(-1, keepdim=True) * ratio
        elif s.kind == "ternary":
            ideal = self._ternary_scale(x) * ratio
        else:
            ideal = amax * ratio / self.table.max_abs
        if s.scale_dtype == "e8m0":
            return QParams(self._e8m0_scale(amax * ratio, ideal))
        return QParams(self.store_scale(ideal, global_scale), None, global_scale)

    def ideal_params(self, x: torch.Tensor, ratio: float | torch.Tensor = 1.0) -> QParams:
        """Unrounded float32 parameters of the min-max rule, for the formats whose storage is more
        than rounding a float (``zero_style="min"``, super-blocks): with mins, the range
        ``[min, max]`` (``min`` only down to 0 when mins are unsigned integers, as in llama.cpp's
        K-quants) as ``scale = range / qmax`` and ``min = -lo``; symmetric, ``amax / (qmax / 2)``."""
        if self.spec.zero_style == "min":
            lo = x.amin(-1, keepdim=True)
            if self.spec.super_min:
                lo = lo.clamp(max=0.0)
            lo, hi = lo * ratio, x.amax(-1, keepdim=True) * ratio
            return QParams((hi - lo) / self.qmax, -lo)
        return QParams(x.abs().amax(-1, keepdim=True) * ratio / (self.qmax / 2))

    def store_params(self, ideal_scale: torch.Tensor, ideal_min: torch.Tensor | None = None) -> QParams:
        """Float scales (and, with ``zero_style="min"``, mins in weight units) rounded to the format's
        storage: float types, or integers times an fp16 super-scale per super-block."""
        s = self.spec
        if s.super_block is None:
            zero = None if ideal_min is None else ideal_min.to(_FLOAT_DTYPES[s.zero_dtype]).float()
            return QParams(self.store_scale(ideal_scale, None), zero)
        scale, super_scale = self._two_level(ideal_scale, s.scale_dtype, keep_nonzero=True)
        if ideal_min is None:
            return QParams(scale, super_scale=super_scale)
        if not s.super_min:
            return QParams(scale, ideal_min.to(_FLOAT_DTYPES[s.zero_dtype]).float(), None, super_scale)
        zero, super_min = self._two_level(ideal_min, s.zero_dtype, keep_nonzero=False)
        return QParams(scale, zero, None, super_scale, super_min)

    def _two_level(self, ideal: torch.Tensor, dtype: str, keep_nonzero: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-negative per-group values as integer codes times an fp16 value per super-block: the
        largest group sets the fp16 value (its code is the top of the range), the others round to
        the nearest multiple of it. ``keep_nonzero``: a group with a range keeps a scale >= 1."""
        lo, hi = INT_CODE_RANGE[dtype]
        k = self.spec.super_block // self.spec.group_size
        rows, groups, _ = ideal.shape
        if groups % k:
            raise FormatError(f"{self.spec.label()}: parameters are chosen per super-block of {k} groups, got {groups}")
        v = ideal.reshape(rows, groups // k, k)
        sup = (v.amax(-1, keepdim=True) / hi).to(torch.float16).float() + 0.0  # + 0.0: no -0.0 stored
        codes = torch.round(v / sup).clamp(lo, hi) + 0.0
        if keep_nonzero:
            codes = torch.where(v > 0, codes.clamp(min=1), codes)
        codes = torch.where(sup > 0, codes, torch.zeros_like(codes))
        return codes.reshape(rows, groups, 1), sup.expand(rows, groups // k, k).reshape(rows, groups, 1)

    def _ternary_scale(self, x: torch.Tensor) -> torch.Tensor:
        mean_abs = x.abs().mean(-1, keepdim=True)
        if self.spec.ternary_method == "absmean":
            return mean_abs
        # Ternary weight networks (Li et al., 2016): threshold 0.7 E|w|, scale = mean of survivors.
        keep = x.abs() > 0.7 * mean_abs
        total = (x.abs() * keep).sum(-1, keepdim=True)
        count = keep.sum(-1, keepdim=True).clamp(min=1)
        return torch.where(total > 0, total / count, mean_abs)

    def _e8m0_scale(self, amax: torch.Tensor, ideal: torch.Tensor) -> torch.Tensor:
        """Power-of-two shared scale of the OCP MX spec: 2^(floor(log2 amax) - emax_elem)."""
        if self.spec.kind == "fp":
            exp = torch.floor(torch.log2(amax.clamp(min=2.0**-127))) - fp_emax(self.spec.element)
        else:  # integer/table grids: smallest power of two that does not clip
            exp = torch.ceil(torch.log2(ideal.clamp(min=2.0**-127)))
        return torch.exp2(exp.clamp(-127, 127))

    def store_scale(self, ideal: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
        s = self.spec
        if s.scale_dtype == "e4m3":
            g = global_scale if global_scale is not None else torch.ones((), device=ideal.device)
            block = (ideal / g).clamp(min=2.0**-9, max=448.0)
            return block.to(torch.float8_e4m3fn).float()
        dtype = _FLOAT_DTYPES[s.scale_dtype]
        tiny = torch.finfo(dtype).tiny
        return ideal.clamp(min=tiny).to(dtype).float()

    @staticmethod
    def _apply_global(scale: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
        return scale if global_scale is None else scale * global_scale

    def find_params(self, xg: torch.Tensor, global_scale: torch.Tensor | None = None) -> QParams:
        """Parameters by the spec's rule (min-max, MSE search over clip ratios, or llama.cpp's)."""
        if self.spec.clip == "llama.cpp":
            from .llamacpp import reference_quantize

            return reference_quantize(self.spec, xg)[0]
        if self.spec.clip == "minmax" or self.spec.kind == "binary":
            return self.compute_params(xg, 1.0, global_scale)
        return self.mse_search(xg, global_scale)

    def mse_search(
        self, xg: torch.Tensor, global_scale: torch.Tensor | None = None, weight: torch.Tensor | None = None
    ) -> QParams:
        """Per group, the clip ratio in ``[clip_min_ratio, 1]`` with the least ``clip_norm`` error.

        ``weight`` (broadcastable to ``xg``) weights each element's error, e.g. by input importance.
        With super-blocks each group's ratio is searched on its unrounded float parameters (groups
        share a super-scale, so rounded candidates of different groups do not combine); the
        chosen parameters are then stored together.
        """
        x = xg.detach().float()
        if self.spec.super_block is not None:
            best = self._clip_search(x, weight, lambda r: self.ideal_params(x, r))
            return self.store_params(best.scale, best.zero)
        return self._clip_search(x, weight, lambda r: self.compute_params(x, r, global_scale))

    def _clip_search(self, x: torch.Tensor, weight: torch.Tensor | None, candidate) -> QParams:
        s = self.spec
        best = candidate(1.0)
        best_err = self._group_error(x, best, weight)
        for ratio in torch.linspace(1.0, s.clip_min_ratio, s.clip_grid + 1)[1:].tolist():
            cand = candidate(ratio)
            err = self._group_error(x, cand, weight)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = best.where(better, cand)
        return best

    def _group_error(self, x: torch.Tensor, p: QParams, weight: torch.Tensor | None) -> torch.Tensor:
        err = (x - self.decode(self.encode(x, p), p)).abs().pow(self.spec.clip_norm)
        if weight is not None:
            err = err * weight
        return err.sum(-1, keepdim=True)

    # ------------------------------------------------------------------ codes
    def encode(self, xg: torch.Tensor, p: QParams) -> torch.Tensor:
        """Unsigned codes (uint8) of ``xg`` under parameters ``p`` (broadcast over the last dim)."""
        x = xg.float()
        scale = p.effective_scale()
        if self.table is not None:
            return self.table.encode(x / scale)
        s = self.spec
        if s.zero_style == "min":  # w = s q - m: q = round((w + m) / s), llama.cpp's nearest_int((x + dm) / d)
            codes, fill = torch.round((x + p.effective_zero()) / scale), 0.0
        else:
            zero = p.zero if p.zero is not None else float(1 << (s.bits - 1))
            if s.super_block is not None or p.zero is None or s.zero_dtype == "int":
                # integer zero-points: round(x/s) + z, as GPTQ, compressed-tensors and llama.cpp's
                # nearest_int(x / d) + offset compute it (x/s + z would round x/s a second time in float32)
                codes = torch.round(x / scale) + zero
            else:
                # float zero-points may be fractional (HQQ): round(x/s + z)
                codes = torch.round(x / scale + zero)
            fill = zero
        if self._zero_scales:  # every code decodes to the same value: take the zero-point (or 0)
            codes = torch.where(scale == 0, fill, codes)
        return torch.clamp(codes, 0, self.qmax).to(torch.uint8)

    def decode(self, codes: torch.Tensor, p: QParams) -> torch.Tensor:
        scale = p.effective_scale()
        if self.table is not None:
            return self.table.decode(codes) * scale
        if self.spec.zero_style == "min":  # ggml's d * q - m (Q4_1 adds its m = -ours: the same float)
            return codes.float() * scale - p.effective_zero()
        zero = p.zero if p.zero is not None else float(1 << (self.spec.bits - 1))
        return (codes.float() - zero) * scale

    def quantize_dequantize(self, x: torch.Tensor, p: QParams) -> torch.Tensor:
        return self.decode(self.encode(x, p), p)

    def _params_and_codes(self, xg: torch.Tensor, gscale: torch.Tensor | None) -> tuple[QParams, torch.Tensor]:
        if self.spec.clip == "llama.cpp":  # the reference's own codes: the legacy types round with the unrounded d
            from .llamacpp import reference_quantize

            return reference_quantize(self.spec, xg)
        p = self.find_params(xg, gscale)
        return p, self.encode(xg, p)

    # ------------------------------------------------------------------ whole tensors
    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_finite(x)
        self.check_shape(tuple(x.shape))
        x2d = self.as_2d(x.detach())
        xg = self.group_view(x2d)
        p, codes = self._params_and_codes(xg, self.global_scale_for(x2d))
        return QuantizedTensor.from_params(codes.reshape(x2d.shape), p, self.spec, tuple(x.shape))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        p = q.params()
        if q.g_idx is not None:
            # Non-contiguous groups: gather each column's parameters.
            cols = q.codes.shape[-1]
            per_col = p.select(q.g_idx.long())  # [rows, cols, 1]
            per_col = replace(per_col, **{name: v.reshape(-1, cols) for name, v in per_col.grouped()})
            return self.decode(q.codes, per_col).reshape(q.shape).to(dtype)
        codes = self.group_view(q.codes)
        return self.decode(codes, p).reshape(q.shape).to(dtype)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize with a straight-through gradient (identity in the backward pass)."""
        x2d = self.as_2d(x)
        xg = self.group_view(x2d)
        p, codes = self._params_and_codes(xg.detach(), self.global_scale_for(x2d))
        dq = self.decode(codes, p).reshape(x.shape).to(x.dtype)
        return straight_through(x, dq)

    # ------------------------------------------------------------------ accounting
    def bits_per_weight(self, shape: tuple[int, ...] | torch.Size) -> float:
        return float(self.exact_bits(shape) / math.prod(shape))

    def exact_bits(self, shape: tuple[int, ...] | torch.Size) -> Fraction:
        """Total storage bits of a tensor of ``shape``: codes, scales, zero-points or mins, global
        scale, and the fp16 super-scales (and super-mins) of super-blocks."""
        s = self.spec
        numel = math.prod(shape)
        cols = shape[-1] if len(shape) else 1
        rows = numel // cols
        if s.granularity == "tensor":
            groups = 1
        else:
            groups = rows * (cols // self.group_size_for(cols, tuple(shape)))
        bits = numel * s.bits + groups * s.scale_bits
        if s.has_zero_point:
            bits += groups * s.zero_bits
        if s.global_scale:
            bits += 32
        if s.super_block is not None:
            bits += (numel // s.super_block) * SUPER_SCALE_BITS * (2 if s.super_min else 1)
        return Fraction(bits)

    def with_spec(self, **changes) -> Quantizer:
        return Quantizer(FormatSpec.model_validate({**self.spec.model_dump(), **changes}))


def straight_through(x: torch.Tensor, dq: torch.Tensor) -> torch.Tensor:
    """``dq`` in the forward pass, the identity's gradient in the backward pass. Without a gradient
    to carry, ``dq`` itself: ``x + (dq - x)`` is not exactly ``dq`` in floating point."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return dq
    return x + (dq - x).detach()


def check_finite(x: torch.Tensor, name: str = "tensor") -> None:
    # One reduction first (NaN/Inf propagate through a sum); the exact count only on failure.
    if torch.isfinite(x.sum(dtype=torch.float64)):
        return
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise FormatError(f"{name} has {bad} non-finite values (NaN/Inf); cannot quantize it")
