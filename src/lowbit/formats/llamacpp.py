"""llama.cpp's reference quantizers (``clip="llama.cpp"``), transcribed to torch.

Each function mirrors a ``quantize_row_*_ref`` of ggml-quants.c (what ``llama-quantize`` runs
without an importance matrix) operation by operation in float32, vectorised over blocks: sums are
accumulated element by element in the C order, ``nearest_int`` is the C bit trick, and the legacy
types compute their codes with the *unrounded* scale, as the reference does. The codes and
parameters are returned in lowbit's convention (unsigned codes; ``w = s*q - m`` with
``m = -ggml's m`` for Q4_1/Q5_1). gguf-py's numpy port of the legacy types gives the same bytes,
except for the sign of a zero d or m in blocks that hold ``-0.0`` (numpy's min/argmax pick
another zero than C's strict comparisons); lowbit follows C.

The search helpers of the K-quants (``make_qkx2_quants`` ...) are in :mod:`.llamacpp_search`.
"""

from __future__ import annotations

import torch

from .llamacpp_search import f32, make_q3_quants, make_qkx2_quants, make_qx_quants, nearest_int, running_max, seq_sum
from .qtensor import QParams
from .spec import FormatSpec

GROUP_MAX_EPS = 1e-15


def reference_quantize(spec: FormatSpec, xg: torch.Tensor) -> tuple[QParams, torch.Tensor]:
    """Parameters ``[rows, groups, 1]`` and codes (uint8, shaped like ``xg``) as llama.cpp's reference
    quantizer of ``spec``'s ggml type chooses them for groups ``xg`` (``[rows, groups, size]``;
    whole super-blocks for the K-quants)."""
    name = spec.ggml_type
    rows, groups, size = xg.shape
    device = xg.device
    x = xg.detach().float().cpu().reshape(-1, spec.super_block or size).contiguous()
    if name in _LEGACY:
        fields, codes = _LEGACY[name](x)
    else:
        fields, codes = _KQUANTS[name](x)
    per_block = (spec.super_block or size) // size  # groups per block

    def shaped(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if t.shape[-1] == 1 and per_block > 1:  # one value per super-block: repeat it for each group
            t = t.expand(-1, per_block)
        return t.reshape(rows, groups, 1).to(device)

    p = QParams(
        shaped(fields["scale"]),
        shaped(fields.get("zero")),
        super_scale=shaped(fields.get("super_scale")),
        super_min=shaped(fields.get("super_min")),
    )
    return p, codes.to(torch.uint8).reshape(xg.shape).to(device)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """ggml's GGML_FP32_TO_FP16 (round to nearest even), back in float32."""
    return t.to(torch.float16).float()


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


# ----------------------------------------------------------------------------- legacy (32 per block)
def _q8_0(x: torch.Tensor):
    d = x.abs().amax(-1, keepdim=True) / 127
    v = x * _inverse(d)
    a = v.abs()
    whole = torch.floor(a)
    q = torch.sign(v) * (whole + torch.floor(2 * (a - whole)))  # roundf: half away from zero
    return {"scale": _fp16(d)}, q + 128


def _symmetric_legacy(nmax: int):
    def quantize(x: torch.Tensor):
        # the element of largest magnitude, sign kept, lands exactly on code 0 (-nmax * d); C starts
        # from max = +0.0, so an all-zero block gets d = -0.0 even if it holds -0.0 (gguf-py: +0.0)
        top = x.gather(-1, x.abs().argmax(-1, keepdim=True))
        top = torch.where(top.abs() > 0, top, torch.zeros_like(top))
        d = top / -nmax
        q = torch.trunc(x * _inverse(d) + f32(nmax + 0.5)).clamp(0, 2 * nmax - 1)
        return {"scale": _fp16(d)}, q

    return quantize


def _min_legacy(qmax: int):
    def quantize(x: torch.Tensor):
        # the first extreme element, as C's strict comparisons keep (it decides the sign of a zero min)
        lo = x.gather(-1, x.argmin(-1, keepdim=True))
        hi = x.gather(-1, x.argmax(-1, keepdim=True))
        d = (hi - lo) / qmax
        q = torch.trunc((x - lo) * _inverse(d) + f32(0.5)).clamp(0, qmax)
        return {"scale": _fp16(d), "zero": -_fp16(lo)}, q

    return quantize


_LEGACY = {
    "q8_0": _q8_0,
    "q4_0": _symmetric_legacy(8),
    "q5_0": _symmetric_legacy(16),
    "q4_1": _min_legacy(15),
    "q5_1": _min_legacy(31),
}


# ----------------------------------------------------------------------------- K-quants (256 per block)
def _recode_min(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, sc, dmin: torch.Tensor, m, qmax: int):
    """The final pass of the asymmetric K-quants: every element against fp16(d)*sc and fp16(dmin)*m;
    sub-blocks whose scale is 0 keep their codes from the search."""
    dd = d * sc.float()  # [N, k]
    dm = dmin * m.float()
    q = nearest_int((x + dm[..., None]) / dd[..., None]).clamp(0, qmax)
    return torch.where((dd != 0)[..., None], q, L)


def _q2_k(x: torch.Tensor):
    n = x.shape[0]
    xs = x.reshape(n * 16, 16)
    scales, mins, L = make_qkx2_quants(xs, xs.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins, L = scales.reshape(n, 16), mins.reshape(n, 16), L.reshape(n, 16, 16)
    max_scale, max_min = running_max(scales), running_max(mins)
    has_scale, has_min = max_scale > 0, max_min > 0
    sc = torch.where(has_scale[:, None], nearest_int(_div(15, max_scale)[:, None] * scales), 0) % 256
    mc = torch.where(has_min[:, None], nearest_int(_div(15, max_min)[:, None] * mins), 0)
    byte = (sc | (mc << 4)) % 256  # the packed byte, as C's uint8 arithmetic leaves it
    sc, mc = byte & 15, byte >> 4
    d = _fp16(torch.where(has_scale, max_scale / 15, 0.0))
    dmin = _fp16(torch.where(has_min, max_min / 15, 0.0))
    codes = _recode_min(x.reshape(n, 16, 16), L, d[:, None], sc, dmin[:, None], mc, 3)
    fields = {"scale": sc.float(), "zero": mc.float(), "super_scale": d[:, None], "super_min": dmin[:, None]}
    return fields, codes


def _q45_k(qmax: int, rmin: float, nstep: int):
    def quantize(x: torch.Tensor):
        n = x.shape[0]
        xs = x.reshape(n * 8, 32)
        sum_x2 = seq_sum(xs * xs)
        # C's sqrtf is correctly rounded; torch's float32 sqrt is not always (vectorised): take it in
        # float64 and round once (exact for sqrt)
        av_x = torch.sqrt((sum_x2 / 32).double()).float()
        weights = av_x[:, None] + xs.abs()
        scales, mins, L = make_qkx2_quants(xs, weights, qmax, rmin, 0.1, nstep, use_mad=False)
        scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)
        max_scale, max_min = running_max(scales), running_max(mins)
        inv_scale = torch.where(max_scale > 0, _div(63, max_scale), 0.0)
        inv_min = torch.where(max_min > 0, _div(63, max_min), 0.0)
        # uint8_t ls = nearest_int(...); ls = MIN(63, ls)
        sc = (nearest_int(inv_scale[:, None] * scales) % 256).clamp(max=63)
        mc = (nearest_int(inv_min[:, None] * mins) % 256).clamp(max=63)
        d, dmin = _fp16(max_scale / 63), _fp16(max_min / 63)
        codes = _recode_min(x.reshape(n, 8, 32), L, d[:, None], sc, dmin[:, None], mc, qmax)
        fields = {"scale": sc.float(), "zero": mc.float(), "super_scale": d[:, None], "super_min": dmin[:, None]}
        return fields, codes

    return quantize


def _q3_k(x: torch.Tensor):
    n = x.shape[0]
    scales, L = make_q3_quants(x.reshape(n * 16, 16), 4)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    max_scale = _signed_max(scales)
    nonzero = max_scale != 0
    iscale = torch.where(nonzero, _div(-32, max_scale), 0.0)
    # int8_t l = nearest_int(iscale*scales[j]); l = MAX(-32, MIN(31, l)) + 32; a zero max leaves u = 0
    u = torch.where(nonzero[:, None], nearest_int(iscale[:, None] * scales).clamp(-32, 31) + 32, 0)
    d = _fp16(torch.where(nonzero, 1 / iscale, 0.0))
    sc = u - 32
    dd = d[:, None] * sc.float()
    q = nearest_int(x.reshape(n, 16, 16) / dd[..., None]).clamp(-4, 3) + 4
    codes = torch.where((dd != 0)[..., None], q, L)
    return {"scale": sc.float(), "super_scale": d[:, None]}, codes


def _q6_k(x: torch.Tensor):
    n = x.shape[0]
    scales, L = make_qx_quants(x.reshape(n * 16, 16), 32)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    max_scale = _signed_max(scales)
    zero_block = max_scale.abs() < GROUP_MAX_EPS  # written as all-zero bytes
    iscale = torch.where(zero_block, 1.0, _div(-128, max_scale))
    d = _fp16(torch.where(zero_block, 0.0, 1 / iscale))
    sc = torch.where(zero_block[:, None], 0, nearest_int(iscale[:, None] * scales).clamp(max=127))
    dd = d[:, None] * sc.float()
    q = nearest_int(x.reshape(n, 16, 16) / dd[..., None]).clamp(-32, 31) + 32
    codes = torch.where((dd != 0)[..., None], q, L)
    codes = torch.where(zero_block[:, None, None], 0, codes)
    return {"scale": sc.float(), "super_scale": d[:, None]}, codes


def _signed_max(v: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude, sign kept, first of equals (C's ``if (fabsf(s) > amax)``), 0 if all 0."""
    return v.gather(-1, v.abs().argmax(-1, keepdim=True))[:, 0]


def _div(numerator: float, t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float(f32(numerator))) / t


_KQUANTS = {
    "q2_k": _q2_k,
    "q3_k": _q3_k,
    "q4_k": _q45_k(15, -1.0, 20),
    "q5_k": _q45_k(31, -0.5, 15),
    "q6_k": _q6_k,
}
