"""Code-usage metrics: utilisation, perplexity and bits per token.

Negative indices (stages removed by quantizer dropout) are ignored everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import Quantizer


def code_histogram(indices: Tensor, codebook_size: int) -> Tensor:
    """Counts per code (float64, shape (codebook_size,)) for indices of any shape that share one codebook."""
    if indices.is_floating_point():
        raise TypeError("indices must be an integer tensor")
    flat = indices.detach().reshape(-1).long()
    flat = flat[flat >= 0]
    if flat.numel() and int(flat.max()) >= codebook_size:
        raise ValueError(f"index {int(flat.max())} is out of range for codebook_size={codebook_size}")
    return torch.bincount(flat.cpu(), minlength=codebook_size).double()


def _entropy_bits(counts: Tensor) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * p.log2()).sum())


def codebook_utilization(indices: Tensor, codebook_size: int) -> float:
    """Fraction of the codebook used at least once."""
    return float((code_histogram(indices, codebook_size) > 0).sum()) / codebook_size


def code_entropy_bits(indices: Tensor, codebook_size: int) -> float:
    """Entropy of the empirical code distribution in bits: the bits per token an ideal entropy coder would spend."""
    return _entropy_bits(code_histogram(indices, codebook_size))


def perplexity(indices: Tensor, codebook_size: int) -> float:
    """2 ** entropy: the number of equally likely codes that would give the same entropy (codebook_size at best)."""
    return 2.0 ** code_entropy_bits(indices, codebook_size)


def bits_per_token(codebook_sizes: int | Sequence[int]) -> float:
    """Nominal bits to store one token's indices with fixed-length codes."""
    sizes = [codebook_sizes] if isinstance(codebook_sizes, int) else list(codebook_sizes)
    if not sizes or any(k < 1 for k in sizes):
        raise ValueError(f"codebook_sizes must be positive, got {sizes}")
    return float(sum(math.log2(k) for k in sizes))


class UsageMeter:
    """Accumulates code counts over many batches, per codebook (index column) of a quantizer."""

    def __init__(self, codebook_sizes: Sequence[int], multi_codebook: bool | None = None) -> None:
        self.codebook_sizes = list(codebook_sizes)
        self.multi_codebook = len(self.codebook_sizes) > 1 if multi_codebook is None else multi_codebook
        self.counts = [torch.zeros(k, dtype=torch.float64) for k in self.codebook_sizes]

    @classmethod
    def for_quantizer(cls, quantizer: Quantizer) -> UsageMeter:
        return cls(quantizer.codebook_sizes, quantizer.multi_codebook)

    def update(self, indices: Tensor) -> None:
        if self.multi_codebook:
            if indices.shape[-1] != len(self.codebook_sizes):
                raise ValueError(
                    f"expected a trailing axis of {len(self.codebook_sizes)} codebooks, got {tuple(indices.shape)}"
                )
            for m, k in enumerate(self.codebook_sizes):
                self.counts[m] += code_histogram(indices[..., m], k)
        else:
            self.counts[0] += code_histogram(indices, self.codebook_sizes[0])

    def per_codebook_utilization(self) -> list[float]:
        return [float((c > 0).sum()) / len(c) for c in self.counts]

    def utilization(self) -> float:
        """Mean fraction of codes used, over codebooks."""
        u = self.per_codebook_utilization()
        return sum(u) / len(u)

    def perplexity(self) -> float:
        """Mean per-codebook perplexity."""
        return sum(2.0 ** _entropy_bits(c) for c in self.counts) / len(self.counts)

    def entropy_bits(self) -> float:
        """Sum of per-codebook entropies: empirical bits per token (an upper bound on the joint entropy)."""
        return sum(_entropy_bits(c) for c in self.counts)

    def nominal_bits(self) -> float:
        return bits_per_token(self.codebook_sizes)
