"""Element grids: the values one code can stand for, before scaling.

A grid maps unsigned integer codes to values and back (round to nearest). Uniform integer grids
are handled arithmetically; every other grid (minifloats, NF4, user tables, binary, ternary) is a
table of values indexed by code.
"""

from __future__ import annotations

import functools
import math

import torch

from .spec import FP_ELEMENTS, FormatSpec


def fp_code_values(element: str) -> torch.Tensor:
    """Value of every bit pattern of a minifloat, indexed by code (NaN where the code is NaN/Inf).

    E4M3 follows the OCP "fn" variant (no infinities, S.1111.111 is NaN, max 448); E5M2 follows
    IEEE conventions (max 57344); the 6- and 4-bit types follow the OCP MX spec (all codes finite).
    """
    e_bits, m_bits = FP_ELEMENTS[element]
    bias = 2 ** (e_bits - 1) - 1
    n = 1 << (1 + e_bits + m_bits)
    values = torch.empty(n, dtype=torch.float64)
    for code in range(n):
        sign = -1.0 if code >> (e_bits + m_bits) else 1.0
        exp = (code >> m_bits) & ((1 << e_bits) - 1)
        man = code & ((1 << m_bits) - 1)
        if element == "e5m2" and exp == (1 << e_bits) - 1:
            values[code] = math.nan
            continue
        if element == "e4m3" and exp == (1 << e_bits) - 1 and man == (1 << m_bits) - 1:
            values[code] = math.nan
            continue
        if exp == 0:
            mag = man / (1 << m_bits) * 2.0 ** (1 - bias)
        else:
            mag = (1 + man / (1 << m_bits)) * 2.0 ** (exp - bias)
        values[code] = sign * mag
    return values


def fp_max(element: str) -> float:
    return float(torch.nan_to_num(fp_code_values(element), nan=0.0).abs().max())


def fp_emax(element: str) -> int:
    """Exponent of the largest normal number (the ``emax_elem`` of the OCP MX spec)."""
    return math.floor(math.log2(fp_max(element)))


@functools.cache
def nf4_values() -> tuple[float, ...]:
    """The NormalFloat-4 grid (Dettmers et al., QLoRA, 2023).

    Quantiles of N(0, 1) split asymmetrically so that 0 is exactly representable: 8 positive and
    7 negative levels, normalised to [-1, 1].
    """
    from scipy.stats import norm

    offset = 0.9677083  # the quantile at which the outermost level sits, as in the paper's code
    positive = norm.ppf(torch.linspace(offset, 0.5, 9).double().numpy()[:-1])
    negative = -norm.ppf(torch.linspace(offset, 0.5, 8).double().numpy()[:-1])
    vals = sorted([*positive.tolist(), 0.0, *negative.tolist()])
    top = max(abs(v) for v in vals)
    return tuple(v / top for v in vals)


class TableGrid:
    """A grid given by a table ``values[code]``; quantisation rounds to the nearest finite value.

    Ties between two neighbours go to the lower one in the sorted table, or with ``ties_to_even`` (the
    minifloat formats) to the one of even rank in magnitude (0, the smallest subnormal, ... count 0,
    1, ...): IEEE round-half-to-even, what a cast to ``float8_e4m3fn`` and the engines that quantize
    activations that way compute. Several codes with the same value (+0 and -0) map to the lowest.
    """

    def __init__(self, code_values: torch.Tensor, ties_to_even: bool = False):
        self.code_values = code_values.to(torch.float32)
        finite = torch.isfinite(code_values)
        codes = torch.nonzero(finite).flatten()
        vals = code_values[codes]
        # Stable sort keeps the lowest code first among equal values (e.g. +0 before -0).
        order = torch.sort(vals, stable=True).indices
        vals, codes = vals[order], codes[order]
        keep = torch.ones_like(vals, dtype=torch.bool)
        keep[1:] = vals[1:] != vals[:-1]
        self.sorted_values = vals[keep].to(torch.float32)
        self.sorted_codes = codes[keep]
        self.midpoints = ((self.sorted_values[1:].double() + self.sorted_values[:-1].double()) / 2).to(torch.float32)
        self.max_abs = float(self.sorted_values.abs().max())
        self.n_codes = len(code_values)
        self.ties_to_even = ties_to_even
        magnitudes = torch.unique(self.sorted_values.abs())  # sorted ascending, 0 first
        rank = torch.bucketize(self.sorted_values.abs(), magnitudes)
        #: per sorted value: its magnitude's rank is odd (its last mantissa bit is set)
        self.odd = (rank % 2).bool()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of the nearest grid values to ``x`` (``x`` already divided by its scale)."""
        idx = self._nearest(x)
        return self.sorted_codes.to(x.device)[idx].to(torch.uint8 if self.n_codes <= 256 else torch.int16)

    def _nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index into ``sorted_values`` of the nearest value (ties as the class says)."""
        mids = self.midpoints.to(x.device)
        x = x.float().contiguous()
        idx = torch.bucketize(x, mids)  # x exactly on a midpoint: the lower neighbour
        if self.ties_to_even:
            at_mid = mids[idx.clamp(max=len(mids) - 1)] == x
            idx = torch.where(at_mid & self.odd.to(x.device)[idx], idx + 1, idx)
        return idx

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.code_values.to(codes.device)[codes.long()]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest grid value (encode then decode in one gather)."""
        return self.sorted_values.to(x.device)[self._nearest(x)]


def table_for(spec: FormatSpec) -> TableGrid:
    """The element table of a non-integer format."""
    if spec.kind == "fp":
        return _fp_table(spec.element)
    if spec.kind == "nf4":
        return TableGrid(torch.tensor(nf4_values(), dtype=torch.float64))
    if spec.kind == "lut":
        vals = sorted(spec.lut)
        return TableGrid(torch.tensor(vals, dtype=torch.float64))
    if spec.kind == "binary":
        return TableGrid(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    if spec.kind == "ternary":
        return TableGrid(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    raise ValueError(f"no table grid for kind={spec.kind!r}")


@functools.cache
def _fp_table(element: str) -> TableGrid:
    return TableGrid(fp_code_values(element), ties_to_even=True)
