"""Quantize, dequantize and fake-quantize tensors in any :class:`FormatSpec`.

Every format is handled the same way: the tensor is viewed as ``[rows, groups, group_size]``,
each group gets parameters (scale, optional zero-point, optional per-tensor global scale) and the
elements become unsigned integer codes on the format's grid. Algorithms that choose codes
themselves (GPTQ, HQQ, AWQ) use :meth:`Quantizer.compute_params`, :meth:`Quantizer.encode` and
:meth:`Quantizer.decode` directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from .grids import TableGrid, fp_emax, table_for
from .spec import FormatSpec

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FormatError(ValueError):
    """A tensor does not fit a format (shape, values)."""


@dataclass
class QParams:
    """Per-group quantization parameters, shaped ``[rows, groups, 1]`` (float32).

    ``scale`` holds the *stored* scale values (already rounded to ``scale_dtype``); the scale
    applied to codes is ``scale * global_scale`` when a global scale is present.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def effective_scale(self) -> torch.Tensor:
        return self.scale if self.global_scale is None else self.scale * self.global_scale

    def select(self, index: torch.Tensor | slice) -> QParams:
        """Parameters of a subset of groups (along dim 1)."""
        return QParams(
            self.scale[:, index],
            None if self.zero is None else self.zero[:, index],
            self.global_scale,
        )


@dataclass
class QuantizedTensor:
    """Integer codes plus the parameters needed to reconstruct a 2-D tensor.

    ``codes`` has the tensor's (2-D) shape; ``scale``/``zero`` are ``[rows, groups]``. ``g_idx``
    maps each column to its group when columns were not grouped contiguously (GPTQ act-order).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    global_scale: torch.Tensor | None
    spec: FormatSpec
    shape: tuple[int, ...]
    g_idx: torch.Tensor | None = field(default=None)

    def params(self) -> QParams:
        return QParams(
            self.scale.unsqueeze(-1),
            None if self.zero is None else self.zero.unsqueeze(-1),
            self.global_scale,
        )

    def bits_per_weight(self) -> float:
        return Quantizer(self.spec).bits_per_weight(self.shape)

    def rows(self, start: int, stop: int) -> QuantizedTensor:
        """Rows ``start:stop`` of a 2-D quantized tensor (views; per-tensor parameters are shared)."""
        if len(self.shape) != 2:
            raise ValueError(f"rows() needs a 2-D quantized tensor, not shape {self.shape}")
        per_row = self.spec.granularity != "tensor"
        return QuantizedTensor(
            codes=self.codes[start:stop],
            scale=self.scale[start:stop] if per_row else self.scale,
            zero=None if self.zero is None else (self.zero[start:stop] if per_row else self.zero),
            global_scale=self.global_scale,
            spec=self.spec,
            shape=(len(range(*slice(start, stop).indices(self.shape[0]))), self.shape[1]),
            g_idx=self.g_idx,
        )


class Quantizer:
    """Quantizer for one :class:`FormatSpec`."""

    def __init__(self, spec: FormatSpec):
        self.spec = spec
        self.qmax = (1 << spec.bits) - 1
        self.table: TableGrid | None = None if spec.kind == "int" else table_for(spec)

    # ------------------------------------------------------------------ shapes
    def group_size_for(self, cols: int) -> int:
        s = self.spec
        if s.granularity == "group":
            if cols % s.group_size != 0:
                raise FormatError(
                    f"group_size {s.group_size} does not divide the input dimension {cols}; "
                    f"choose a group size that divides {cols}"
                )
            return s.group_size
        return cols

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
        gs = self.group_size_for(cols)
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
        """Parameters for groups ``xg`` (``[rows, groups, size]``), shrinking the range by ``ratio``."""
        s = self.spec
        x = xg.detach().float()
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
        """Parameters by the spec's clipping rule (min-max, or MSE search over clip ratios)."""
        if self.spec.clip == "minmax" or self.spec.kind == "binary":
            return self.compute_params(xg, 1.0, global_scale)
        return self.mse_search(xg, global_scale)

    def mse_search(
        self, xg: torch.Tensor, global_scale: torch.Tensor | None = None, weight: torch.Tensor | None = None
    ) -> QParams:
        """Per group, the clip ratio in ``[clip_min_ratio, 1]`` with the least ``clip_norm`` error.

        ``weight`` (broadcastable to ``xg``) weights each element's error, e.g. by input importance.
        """
        s = self.spec
        x = xg.detach().float()
        best = self.compute_params(x, 1.0, global_scale)
        best_err = self._group_error(x, best, weight)
        for ratio in torch.linspace(1.0, s.clip_min_ratio, s.clip_grid + 1)[1:].tolist():
            cand = self.compute_params(x, ratio, global_scale)
            err = self._group_error(x, cand, weight)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best.scale = torch.where(better, cand.scale, best.scale)
            if best.zero is not None:
                best.zero = torch.where(better, cand.zero, best.zero)
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
        if self.table is None:
            zero = p.zero if p.zero is not None else float(1 << (self.spec.bits - 1))
            # round(x/s + z), not round(x/s) + z: the same for integer zero-points, and right for
            # the fractional ones HQQ produces
            return torch.clamp(torch.round(x / scale + zero), 0, self.qmax).to(torch.uint8)
        return self.table.encode(x / scale)

    def decode(self, codes: torch.Tensor, p: QParams) -> torch.Tensor:
        scale = p.effective_scale()
        if self.table is None:
            zero = p.zero if p.zero is not None else float(1 << (self.spec.bits - 1))
            return (codes.float() - zero) * scale
        return self.table.decode(codes) * scale

    def quantize_dequantize(self, x: torch.Tensor, p: QParams) -> torch.Tensor:
        return self.decode(self.encode(x, p), p)

    # ------------------------------------------------------------------ whole tensors
    def quantize(self, x: torch.Tensor) -> QuantizedTensor:
        check_finite(x)
        x2d = self.as_2d(x.detach())
        xg = self.group_view(x2d)
        gscale = self.global_scale_for(x2d)
        p = self.find_params(xg, gscale)
        codes = self.encode(xg, p).reshape(x2d.shape)
        return QuantizedTensor(
            codes=codes,
            scale=p.scale.squeeze(-1),
            zero=None if p.zero is None else p.zero.squeeze(-1),
            global_scale=p.global_scale,
            spec=self.spec,
            shape=tuple(x.shape),
        )

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        p = q.params()
        if q.g_idx is not None:
            # Non-contiguous groups: gather each column's parameters.
            cols = q.codes.shape[-1]
            per_col = p.select(q.g_idx.long())  # [rows, cols, 1]
            per_col = QParams(
                per_col.scale.reshape(-1, cols),
                None if per_col.zero is None else per_col.zero.reshape(-1, cols),
                per_col.global_scale,
            )
            return self.decode(q.codes, per_col).reshape(q.shape).to(dtype)
        codes = self.group_view(q.codes)
        return self.decode(codes, p).reshape(q.shape).to(dtype)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize with a straight-through gradient (identity in the backward pass)."""
        x2d = self.as_2d(x)
        xg = self.group_view(x2d)
        p = self.find_params(xg, self.global_scale_for(x2d))
        dq = self.decode(self.encode(xg, p), p).reshape(x.shape).to(x.dtype)
        return x + (dq - x).detach()

    # ------------------------------------------------------------------ accounting
    def bits_per_weight(self, shape: tuple[int, ...] | torch.Size) -> float:
        return float(self.exact_bits(shape) / math.prod(shape))

    def exact_bits(self, shape: tuple[int, ...] | torch.Size) -> Fraction:
        """Total storage bits of a tensor of ``shape``: codes, scales, zero-points, global scale."""
        s = self.spec
        numel = math.prod(shape)
        cols = shape[-1] if len(shape) else 1
        rows = numel // cols
        if s.granularity == "tensor":
            groups = 1
        else:
            groups = rows * (cols // self.group_size_for(cols))
        bits = numel * s.bits + groups * s.scale_bits
        if s.has_zero_point:
            bits += groups * s.zero_bits
        if s.global_scale:
            bits += 32
        return Fraction(bits)

    def with_spec(self, **changes) -> Quantizer:
        return Quantizer(FormatSpec.model_validate({**self.spec.model_dump(), **changes}))


def check_finite(x: torch.Tensor, name: str = "tensor") -> None:
    # One reduction first (NaN/Inf propagate through a sum); the exact count only on failure.
    if torch.isfinite(x.sum(dtype=torch.float64)):
        return
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise FormatError(f"{name} has {bad} non-finite values (NaN/Inf); cannot quantize it")
