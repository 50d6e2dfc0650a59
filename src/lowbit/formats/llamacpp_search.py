"""The search helpers of llama.cpp's K-quant reference quantizers (ggml-quants.c), in torch.

Each works on many blocks at once (``x``: ``[blocks, n]``) and keeps the C code's float32
operation order: sums run element by element (torch's own reductions and cumsum sum in another
order or in float64), products associate left to right as written in C, and the data-dependent
branches become masks. ggml-base is built without ``-march=native`` (no
FMA contraction), so this order is the whole story. CPU tensors only.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15


def f32(value: float) -> float:
    """``value`` rounded to float32 (a C ``float`` literal)."""
    return float(np.float32(value))


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """C's ``nearest_int``: add 1.5 * 2^23 in float32 and read the low mantissa bits (round half to
    even for |v| < 2^22, and the same bits as C beyond)."""
    val = v.float() + 12582912.0
    return (val.view(torch.int32) & 0x7FFFFF).long() - 0x400000


def running_max(v: torch.Tensor) -> torch.Tensor:
    """``m = 0; for (...) if (v > m) m = v;`` over the last dimension."""
    m = v.amax(-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _signed_top(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude, sign kept, first of equals (``if (ax > amax)``)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))[:, 0]


def seq_sum(terms: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """``s = 0; for (i) s += terms[i];`` over the last dimension in float32, in order (without
    ``from_zero``: ``s = terms[0]; for (i >= 1) ...``). Adding 0.0 at the end gives a sum that
    started from ``0.0f`` (they differ only in the sign of an all-zero sum)."""
    terms = terms.float()
    total = terms[..., 0].clone()
    for i in range(1, terms.shape[-1]):
        total += terms[..., i]
    return total + 0.0 if from_zero else total


def _error(scale, L, offset, x, weights, use_mad: bool) -> torch.Tensor:
    """``sum w * f(scale*L + offset - x)``, element by element."""
    diff = scale[:, None] * L.float() + offset[:, None] - x
    diff = diff.abs() if use_mad else diff * diff
    return seq_sum(weights * diff)


def make_qkx2_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric grid ``[0, nmax]`` with min <= 0: returns ``(scale, the_min, L)`` per block,
    ``x ~ scale * L - the_min`` (the weighted least-squares fit over a grid of step candidates)."""
    # the first extreme elements (strict comparisons from x[0]); sums start from element 0
    lo = x.gather(-1, x.argmin(-1, keepdim=True))[:, 0]
    hi = x.gather(-1, x.argmax(-1, keepdim=True))[:, 0]
    sum_w = seq_sum(weights, from_zero=False)
    sum_x = seq_sum(weights * x, from_zero=False)
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat, flat_min = hi == lo, lo.clone()  # C returns early for these: L = 0, scale 0
    iscale = torch.full_like(lo, float(nmax)) / (hi - lo)
    scale = 1 / iscale
    L = nearest_int(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)
    best_error = _error(scale, L, lo, x, weights, use_mad)
    for step in range(nstep + 1):
        numerator = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = torch.full_like(lo, numerator) / (hi - lo)
        Laux = nearest_int(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)
        wl = weights * Laux.float()
        sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * Laux.float()), seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        cur_error = _error(this_scale, Laux, this_min, x, weights, use_mad)
        better = (D > 0) & (cur_error < best_error)
        L = torch.where(better[:, None], Laux, L)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)  # later candidates start from the new min, as in C
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -torch.where(flat, flat_min, lo), L


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric grid ``[-nmax, nmax-1]`` (``rmse_type=1``, weights ``x^2``): returns ``(scale, L)``
    with ``L = l + nmax``; the scale is signed (the largest element lands on ``-nmax``)."""
    top = _signed_top(x)
    zero = top.abs() < GROUP_MAX_EPS
    w = x * x

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lvals = nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        lf = lvals.float()
        return lvals, seq_sum(w * x * lf), seq_sum(w * lf * lf)

    lvals, sumlx, suml2 = sums(torch.full_like(top, float(-nmax)) / top)
    L = lvals + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        numerator = -float(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        lvals, sumlx, suml2 = sums(torch.full_like(top, numerator) / top)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better[:, None], lvals + nmax, L)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    return torch.where(zero, torch.zeros_like(scale), scale), L


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K's sub-block search (``do_rmse=true``): start at ``-nmax/max``, then up to 5 passes of
    element-wise coordinate descent on the weighted (``x^2``) least-squares error. Returns
    ``(scale, L)`` with ``L = l + nmax`` (all-zero blocks: L = 0, scale 0)."""
    top = _signed_top(x)
    zero = top.abs() < GROUP_MAX_EPS
    w = x * x
    L = nearest_int((torch.full_like(top, float(-nmax)) / top)[:, None] * x).clamp(-nmax, nmax - 1)
    sumlx, suml2 = seq_sum(w * x * L.float()), seq_sum(w * L.float() * L.float())
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i].float()
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = nearest_int(xi * sl2 / slx).clamp(-nmax, nmax - 1)
            nl = new_l.float()
            slx_new = slx + wi * xi * nl
            sl2_new = sl2 + wi * nl * nl
            accept = (slx > 0) & (new_l != L[:, i]) & (sl2_new > 0)
            accept &= slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new
            L[:, i] = torch.where(accept, new_l, L[:, i])
            sumlx = torch.where(accept, slx_new, sumlx)
            suml2 = torch.where(accept, sl2_new, suml2)
            changed |= accept
        # a block without changes in a pass has none in the next (C stops it there)
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L = torch.where(zero[:, None], torch.zeros_like(L), L + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), L
