"""A linear layer whose weight stays quantized in memory, with the matmul chosen by batch size.

Storage, by format (one copy of the weight, never a dequantized one kept):

- 4-bit integers in groups of 32-256 (or per channel), output rows a multiple of 32 (INT4, llama.cpp's
  Q4_0, Q4_1 and Q4_K): two codes per byte, scales and zeros folded into ``q * s + o`` per group
  (fractional HQQ zero-points and K-quant mins too). Kernel: lowbit's own (:mod:`lowbit.kernels`,
  float32 with activations rounded to int8 per 32 inputs, compiled on first use) where it is
  available and the group size fits it; else torch's ``_weight_int4pack_mm_for_cpu`` on its own
  layout, in bfloat16 (in float32 torch's int4 kernel is 10-30x slower).
- 8-bit symmetric integers per output channel: int8 codes and one scale per row. Kernel:
  ``_weight_int8pack_mm``, in bfloat16.
- everything else: lowbit's packed codes and parameters; kernel: dequantize, then ``F.linear``.

The format's own parameters stay beside the kernels' copies, so dequantizing gives lowbit's values
exactly.

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
from ..kernels import int4_alignment, int4_gemm, pack_int4, unpack_int4
from ..models.dtypes import arithmetic_dtype

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
        and (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") or int4_alignment() is not None)
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


_PARAMS = ("scale", "zero", "global_scale", "super_scale", "super_min", "g_idx")


def _compact(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter tensor in float16 where that holds it exactly (fp16 scales, integer zero-points and
    sub-block scales), else as it is: the same values in less memory."""
    if t is None or not t.is_floating_point():
        return t
    half = t.to(torch.float16)
    return half if torch.equal(half.float(), t.float()) else t


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` kept quantized; see the module docstring for the kernels.

    The codes are held once (in the int4 kernel's layout, as int8, or packed by lowbit); the
    parameters as the format stores them (float16 where exact), so :meth:`quantized` gives back
    exactly the codes and parameters the layer was built from, and :meth:`dense_weight` lowbit's
    dequantized values.
    """

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype, native: bool = True):
        """``native=False``: always dequantize and compute in ``dtype`` (exact, e.g. for evaluation)."""
        super().__init__()
        self.native = native
        self.out_features, self.in_features = q.shape
        self.spec: FormatSpec = q.spec
        self.dtype = dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        for name in _PARAMS:
            self.register_buffer(name, _compact(getattr(q, name)))
        lowbit_int4 = int4_alignment()
        if _int4_eligible(q) and (lowbit_int4 or _int4_layout_matches_torch()):
            self.kernel = "int4"
            self.group = self.spec.group_size if self.spec.granularity == "group" else self.in_features
            # w = q * s + o per group (o = -z * s for a zero-point z, -m for a stored min m: fractional zeros
            # and K-quant mins work alike)
            p = q.params()
            scale = p.effective_scale()[..., 0].expand(self.out_features, -1).float()
            zero = p.effective_zero()
            if zero is None:
                offset = -8 * scale  # symmetric codes are stored around 8
            elif self.spec.zero_style == "min":
                offset = -zero[..., 0].float().expand_as(scale)
            else:
                offset = -zero[..., 0].float() * scale
            self.lowbit_kernel = bool(lowbit_int4) and self.group % lowbit_int4 == 0
            if self.lowbit_kernel:
                self.register_buffer("packed", pack_int4(q.codes))
                self.register_buffer("kernel_scale", scale.contiguous())
                self.register_buffer("kernel_offset", offset.contiguous())
            else:
                self.register_buffer("packed", int4_layout(q.codes))
                # torch's kernel computes (q - 8) * s + m: m = o + 8 s
                sz = torch.stack([scale, offset + 8 * scale], -1).transpose(0, 1).to(NATIVE_DTYPE).contiguous()
                self.register_buffer("scales_and_zeros", sz)  # [groups, out, 2], the kernel's dtype
        elif _int8_eligible(q):
            self.kernel = "int8"
            self.register_buffer("weight_int8", (q.codes.to(torch.int16) - 128).to(torch.int8))
        else:
            self.kernel = "dequantize"
            self.register_buffer("codes", pack(q.codes, q.spec.bits, torch.uint8))

    @classmethod
    def from_quantized(
        cls, q: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype, native: bool = True
    ) -> PackedLinear:
        return cls(q, bias, dtype, native)

    # ------------------------------------------------------------------ weights
    def _codes(self) -> torch.Tensor:
        if self.kernel == "int4":
            return unpack_int4(self.packed) if self.lowbit_kernel else int4_codes(self.packed, self.in_features)
        if self.kernel == "int8":
            return (self.weight_int8.to(torch.int16) + 128).to(torch.uint8)
        return unpack(self.codes, self.spec.bits, self.in_features)

    def quantized(self) -> QuantizedTensor:
        """The layer's codes and parameters, exactly as it was built from them."""
        params = {name: getattr(self, name) for name in _PARAMS}
        params = {
            n: (t.to(torch.int32) if n == "g_idx" else t.float()) if t is not None else None for n, t in params.items()
        }
        return QuantizedTensor(
            codes=self._codes(), spec=self.spec, shape=(self.out_features, self.in_features), **params
        )

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight ``[out, in]`` in ``dtype`` (default: the compute dtype), a temporary."""
        return Quantizer(self.spec).dequantize(self.quantized()).to(dtype or self.dtype)

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
        # bf16/fp16 models on CPUs without those instructions: the matmul in float32 (about 8x faster)
        arithmetic = arithmetic_dtype(self.dtype, x.device)
        bias = None if self.bias is None else self.bias.to(arithmetic)
        return F.linear(x.to(arithmetic), self.dense_weight(arithmetic), bias).to(self.dtype)

    def forward_native(self, x2d: torch.Tensor) -> torch.Tensor:
        """The weight-only kernel on ``[rows, in]`` inputs (no bias): lowbit's int4 kernel (float32,
        activations rounded to int8 per 32), else torch's in :data:`NATIVE_DTYPE`."""
        if self.kernel == "int4" and self.lowbit_kernel:
            return int4_gemm(x2d, self.packed, self.kernel_scale, self.kernel_offset, self.group)
        x2d = x2d.to(NATIVE_DTYPE)
        if self.kernel == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.packed, self.group, self.scales_and_zeros)
        return torch.ops.aten._weight_int8pack_mm(x2d, self.weight_int8, self.scale.reshape(-1).to(NATIVE_DTYPE))

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
    dense = PackedLinear(q, None, dtype, native=False)  # the layer's dequantize-then-matmul path

    def seconds(rows: int, native: bool) -> float:
        x = torch.randn(rows, k, generator=gen).to(dtype)
        run = (lambda: layer.forward_native(x)) if native else (lambda: dense(x))
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
