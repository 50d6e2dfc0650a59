"""A linear layer whose weight stays quantized in memory, with the matmul chosen by batch size.

Storage, by format (one copy of the weight, never a dequantized one kept):

- 4-bit integers in groups of 32-256 (or per channel), output rows a multiple of 32: torch's CPU
  int4 layout (``_convert_weight_to_int4pack_for_cpu``), two codes per byte, with scales and zeros
  folded into the ``(q - 8) * s + m`` form its kernel uses (``m = (8 - z) * s``, so fractional HQQ
  zero-points work too). Kernel: ``_weight_int4pack_mm_for_cpu``.
- 8-bit symmetric integers per output channel: int8 codes and one scale per row. Kernel:
  ``_weight_int8pack_mm``.
- everything else: lowbit's packed codes and parameters; kernel: dequantize, then ``F.linear``.

The weight-only kernels run in bfloat16 (their fast path on CPUs; in float32 torch's int4 kernel is
10-30x slower): inputs are cast to bfloat16 and the outputs back. Scales and zeros are kept in
float32, so dequantizing gives lowbit's values exactly.

Every layer can also dequantize into a temporary dense weight and call ``F.linear`` in the model's
dtype: for a large batch that beats the weight-only kernels, whose cost grows with the batch while
the dequantization is paid once per call. Which path is faster at which batch size is measured on
this machine once per dtype (:func:`crossover_rows`) and logged; the layer takes the native kernel
below that many rows.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import FormatSpec, QuantizedTensor, Quantizer, make_format, pack, unpack

log = logging.getLogger(__name__)

_INT4_GROUPS = (32, 64, 128, 256)
#: the dtype the weight-only kernels compute in
NATIVE_DTYPE = torch.bfloat16


def _int4_eligible(q: QuantizedTensor) -> bool:
    s = q.spec
    rows, cols = q.shape
    group = s.group_size if s.granularity == "group" else cols if s.granularity == "channel" else 0
    return (
        s.kind == "int"
        and s.bits == 4
        and q.g_idx is None
        and rows % 32 == 0
        and group in _INT4_GROUPS
        and cols % group == 0
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    )


def _int8_eligible(q: QuantizedTensor) -> bool:
    s = q.spec
    return (
        s.kind == "int"
        and s.bits == 8
        and not s.has_zero_point
        and s.granularity == "channel"
        and q.g_idx is None
        and hasattr(torch.ops.aten, "_weight_int8pack_mm")
    )


def int4_layout(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``[N, K]`` in torch's CPU int4 layout: per block of 32 output rows, for
    each input column, 16 bytes holding rows ``j`` (low nibble) and ``16 + j`` (high nibble)."""
    n, k = codes.shape
    blocks = codes.to(torch.uint8).reshape(n // 32, 2, 16, k).permute(0, 3, 1, 2)  # [N/32, K, 2, 16]
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def int4_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`int4_layout`."""
    n = packed.shape[0]
    t = packed.view(n // 32, k, 16)
    return torch.stack([t & 15, t >> 4], dim=2).permute(0, 2, 3, 1).reshape(n, k)


@functools.cache
def _int4_layout_matches_torch() -> bool:
    """Whether this torch packs int4 weights as :func:`int4_layout` does (checked once: the layout
    is torch's internal business)."""
    w = torch.randint(0, 16, (64, 128), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        return torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 1), int4_layout(w))
    except (RuntimeError, AttributeError):
        return False


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` kept quantized; see the module docstring for the kernels."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype, native: bool = True):
        """``native=False``: always dequantize and compute in ``dtype`` (exact, e.g. for evaluation)."""
        super().__init__()
        self.native = native
        self.out_features, self.in_features = q.shape
        self.spec: FormatSpec = q.spec
        self.dtype = dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        if _int4_eligible(q) and _int4_layout_matches_torch():
            self.kernel = "int4"
            self.register_buffer("packed", int4_layout(q.codes))
            self.group = self.spec.group_size if self.spec.granularity == "group" else self.in_features
            scale = q.scale.float()
            zero = q.zero.float() if q.zero is not None else torch.full_like(scale, 8.0)
            # [groups, out, 2]: (q - 8) * s + (8 - z) * s = (q - z) * s
            sz = torch.stack([scale, (8 - zero) * scale], -1).transpose(0, 1).contiguous()
            self.register_buffer("scales_and_zeros", sz)
        elif _int8_eligible(q):
            self.kernel = "int8"
            self.register_buffer("weight_int8", (q.codes.to(torch.int16) - 128).to(torch.int8))
            self.register_buffer("row_scale", q.scale.reshape(-1).float())
        else:
            self.kernel = "dequantize"
            self.register_buffer("codes", pack(q.codes, q.spec.bits, torch.uint8))
            self.register_buffer("scale", q.scale.float())
            self.register_buffer("zero", None if q.zero is None else q.zero.float())
            self.register_buffer("global_scale", None if q.global_scale is None else q.global_scale.float())
            self.register_buffer("g_idx", None if q.g_idx is None else q.g_idx.to(torch.int32))

    @classmethod
    def from_quantized(
        cls, q: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype, native: bool = True
    ) -> PackedLinear:
        return cls(q, bias, dtype, native)

    # ------------------------------------------------------------------ weights
    def quantized(self) -> QuantizedTensor:
        """The layer's codes and parameters (for export, or to check them)."""
        shape = (self.out_features, self.in_features)
        if self.kernel == "int4":
            sz = self.scales_and_zeros.float().transpose(0, 1)  # [out, groups, 2]
            scale = sz[..., 0]
            zero = 8 - sz[..., 1] / torch.where(scale == 0, torch.ones_like(scale), scale)
            codes = int4_codes(self.packed, self.in_features)
            return QuantizedTensor(codes, scale, zero if self.spec.has_zero_point else None, None, self.spec, shape)
        if self.kernel == "int8":
            codes = (self.weight_int8.to(torch.int16) + 128).to(torch.uint8)
            return QuantizedTensor(codes, self.row_scale.float()[:, None], None, None, self.spec, shape)
        return QuantizedTensor(
            unpack(self.codes, self.spec.bits, self.in_features),
            self.scale,
            self.zero,
            self.global_scale,
            self.spec,
            shape,
            self.g_idx,
        )

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight ``[out, in]`` in the compute dtype (a temporary)."""
        if self.kernel == "int4":
            sz = self.scales_and_zeros.transpose(0, 1)  # [out, groups, 2]
            w = int4_codes(self.packed, self.in_features).view(self.out_features, -1, self.group).float()
            w = w.sub_(8).mul_(sz[..., :1]).add_(sz[..., 1:])
            return w.reshape(self.out_features, self.in_features).to(self.dtype)
        if self.kernel == "int8":
            return (self.weight_int8.float() * self.row_scale[:, None]).to(self.dtype)
        return Quantizer(self.spec).dequantize(self.quantized()).to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A dense view for code that reads ``.weight`` (shape, dtype, device): dequantized on demand."""
        return self.dense_weight()

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        x = x.to(self.dtype)
        if (
            self.native
            and self.kernel != "dequantize"
            and x.device.type == "cpu"
            and rows < crossover_rows(self.kernel, self.dtype)
        ):
            y = self.forward_native(x.reshape(-1, self.in_features)).to(self.dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dense_weight(), self.bias)

    def forward_native(self, x2d: torch.Tensor) -> torch.Tensor:
        """The weight-only kernel on ``[rows, in]`` inputs (no bias), computed in :data:`NATIVE_DTYPE`."""
        x2d = x2d.to(NATIVE_DTYPE)
        if self.kernel == "int4":
            sz = self.scales_and_zeros.to(NATIVE_DTYPE)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.packed, self.group, sz)
        return torch.ops.aten._weight_int8pack_mm(x2d, self.weight_int8, self.row_scale.to(NATIVE_DTYPE))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label()}, kernel={self.kernel}"


@functools.cache
def crossover_rows(kernel: str, dtype: torch.dtype, n: int = 2048, k: int = 2048) -> float:
    """From how many input rows dequantize-then-matmul beats the weight-only kernel, measured here
    on an ``n x k`` layer (the kernel's cost grows with the rows, the dequantization's does not)."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16 if kernel == "int4" else 256, (n, k), generator=gen, dtype=torch.uint8)
    spec = make_format("int4", group_size=128) if kernel == "int4" else make_format("int8", group_size=-1)
    groups = k // 128 if kernel == "int4" else 1
    q = QuantizedTensor(codes, torch.full((n, groups), 0.01), None, None, spec, (n, k))
    layer = PackedLinear(q, None, dtype)
    if layer.kernel != kernel:
        return 0.0

    def seconds(rows: int, native: bool) -> float:
        x = torch.randn(rows, k, generator=gen).to(dtype)
        run = (lambda: layer.forward_native(x)) if native else (lambda: F.linear(x, layer.dense_weight()))
        run()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        return best

    small, large = 1, 64
    native = [seconds(small, True), seconds(large, True)]
    dense = [seconds(small, False), seconds(large, False)]
    # cost(rows) ~ fixed + rows * per_row for both: the rows where the two lines cross
    slope_native = (native[1] - native[0]) / (large - small)
    slope_dense = (dense[1] - dense[0]) / (large - small)
    fixed_native, fixed_dense = native[0] - slope_native * small, dense[0] - slope_dense * small
    if slope_native <= slope_dense:
        rows = float("inf") if fixed_native <= fixed_dense else 0.0
    else:
        rows = max(0.0, (fixed_dense - fixed_native) / (slope_native - slope_dense))
    log.info(
        "%s weights in %s: native kernel below %s rows per call, dequantize + matmul above "
        "(measured: 1 row %.2f vs %.2f ms, %d rows %.2f vs %.2f ms)",
        kernel,
        str(dtype).removeprefix("torch."),
        f"{rows:.0f}" if rows != float("inf") else "any number of",
        native[0] * 1e3,
        dense[0] * 1e3,
        large,
        native[1] * 1e3,
        dense[1] * 1e3,
    )
    return rows
