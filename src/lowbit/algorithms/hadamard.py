"""Orthogonal rotations for QuaRot-style incoherence processing: a fast Walsh-Hadamard transform
and rotations of any width built from it.

- :func:`fwht` applies the normalised Hadamard matrix ``H_n / sqrt(n)`` (Sylvester's construction,
  ``n`` a power of two) along the last dimension in ``O(n log n)``: ``log2(n)`` butterfly stages
  on a reshaped view, no ``n x n`` matrix.
- :class:`Rotation` is an orthogonal ``n x n`` matrix for any ``n``: a randomised Hadamard
  (``H diag(signs)``, random signs from a seed) when ``n`` is a power of two; otherwise ``n = 2^k
  * m`` with ``m`` odd, and the rotation is the Kronecker product of the randomised ``H_{2^k}`` and
  a random ``m x m`` orthogonal matrix (QR of a Gaussian one; sign-fixed so it is Haar-distributed),
  applied as two small matmuls; or a random ``n x n`` orthogonal matrix (``kind="orthogonal"``).

Rotating a linear's input by ``R`` and its weight by ``R`` (``W R``, then ``(x R)(W R)^T = x W^T``)
leaves the function unchanged; QuaRot's point is that ``x R`` and ``W R`` have far smaller
outliers, so they quantize better.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` along the last dimension (``n`` a power of two), in ``O(n log n)``.
    ``H_n`` is symmetric and ``(H_n / sqrt(n))^2 = I``: the transform is its own inverse."""
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"the fast Hadamard transform needs a power-of-two width, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        # pairs (i, i + h) within blocks of 2h: [a, b] -> [a + b, a - b]
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(n)).to(x.dtype)


def _random_orthogonal(m: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random ``m x m`` orthogonal matrix (float64)."""
    q, r = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    return (q * torch.where(signs != 0, signs, 1.0)).contiguous()


class Rotation:
    """An orthogonal ``n x n`` matrix ``R``, applied as ``x @ R`` along the last dimension.

    Args:
        n: the width.
        kind: ``hadamard`` (randomised Hadamard, times a small random orthogonal factor when ``n``
            is not a power of two) or ``orthogonal`` (a dense random orthogonal matrix).
        seed: the random signs and factors; the same seed gives the same rotation.
    """

    def __init__(self, n: int, kind: Literal["hadamard", "orthogonal"] = "hadamard", seed: int = 0):
        if n < 1:
            raise ValueError(f"rotation width must be positive, got {n}")
        if kind not in ("hadamard", "orthogonal"):
            raise ValueError(f"rotation kind must be 'hadamard' or 'orthogonal', got {kind!r}")
        self.n, self.kind, self.seed = n, kind, seed
        generator = torch.Generator().manual_seed(seed)
        if kind == "orthogonal":
            self.dense = _random_orthogonal(n, generator)
            return
        self.dense = None
        self.power = n & -n  # the largest power of two dividing n
        self.odd = n // self.power
        self.signs = torch.randint(0, 2, (self.power,), generator=generator, dtype=torch.float64) * 2 - 1
        self.factor = _random_orthogonal(self.odd, generator) if self.odd > 1 else None

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> Rotation:
        """A rotation given by its matrix (e.g. a learned one); applied as a dense matmul."""
        rotation = cls.__new__(cls)
        rotation.n, rotation.kind, rotation.seed = matrix.shape[0], "orthogonal", -1
        rotation.dense = matrix.detach().to("cpu", torch.float64).contiguous()
        return rotation

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R`` along the last dimension, in ``x``'s dtype (computed in float32 at least)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"rotation of width {self.n} applied to a last dimension of {x.shape[-1]}")
        work = torch.promote_types(x.dtype, torch.float32)
        y = x.to(work)
        if self.dense is not None:
            return (y @ self.dense.to(y.device, work)).to(x.dtype)
        lead = y.shape[:-1]
        # R = (diag(s) H / sqrt(p)) kron Q: view x as [.., p, m]; index i = a * m + b
        y = y.reshape(*lead, self.power, self.odd)
        if self.factor is not None:
            y = y @ self.factor.to(y.device, work)
        y = y.transpose(-1, -2) * self.signs.to(y.device, work)  # [.., m, p], signs on the Hadamard side
        y = fwht(y).transpose(-1, -2)
        return y.reshape(*lead, self.n).to(x.dtype)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``R`` itself (``n x n``): the rotation of the identity."""
        return self.apply(torch.eye(self.n, dtype=torch.float64)).to(dtype)


class OnlineRotation(nn.Module):
    """Rotates a linear's input at run time (QuaRot's online Hadamard before ``down_proj``): the
    linear's weight holds ``W R`` and its input becomes ``x R``. No parameters: the rotation is
    rebuilt from ``(size, kind, seed)``, which the saved config records."""

    def __init__(self, size: int, kind: Literal["hadamard", "orthogonal"] = "hadamard", seed: int = 0):
        super().__init__()
        self.rotation = Rotation(size, kind, seed)

    def describe(self) -> dict:
        return {"size": self.rotation.n, "kind": self.rotation.kind, "seed": self.rotation.seed}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation.apply(x)

    def extra_repr(self) -> str:
        return f"size={self.rotation.n}, kind={self.rotation.kind}, seed={self.rotation.seed}"


def _rotate_input_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.input_rotation(args[0]), *args[1:]) if args else args


def attach_online_rotation(linear: nn.Module, rotation: OnlineRotation) -> None:
    """Make ``linear`` rotate its input first, before any other pre-hook (an input quantizer must see
    the rotated input, as QuaRot quantizes it)."""
    had = isinstance(getattr(linear, "input_rotation", None), OnlineRotation)
    linear.input_rotation = rotation
    if not had:
        linear.register_forward_pre_hook(_rotate_input_hook, prepend=True)


def online_rotation_of(linear: nn.Module) -> OnlineRotation | None:
    rotation = getattr(linear, "input_rotation", None)
    return rotation if isinstance(rotation, OnlineRotation) else None


def attach_online_rotations(model: nn.Module, entries: list[dict]) -> int:
    """Re-attach the online rotations a saved config lists (``[{"suffix", "size", "kind", "seed"}]``:
    every linear whose name ends with ``suffix``); returns how many layers got one."""
    count = 0
    for entry in entries:
        suffix = "." + entry["suffix"]
        for name, module in model.named_modules():
            if name.endswith(suffix):
                attach_online_rotation(module, OnlineRotation(int(entry["size"]), entry["kind"], int(entry["seed"])))
                count += 1
    return count


@torch.no_grad()
def rotate_rows_(weight: torch.Tensor, rotation: Rotation, chunk_bytes: int = 16 * 2**20) -> None:
    """``W <- W R`` in place (each row times ``R``; ``W`` of any dtype), a slice of rows at a time so
    that a large weight never has a whole float32 copy."""
    rows = max(1, chunk_bytes // (4 * weight.shape[-1]))
    for start in range(0, weight.shape[0], rows):
        part = weight[start : start + rows]
        part.copy_(rotation.apply(part.float()).to(weight.dtype))


@torch.no_grad()
def rotate_columns_(weight: torch.Tensor, rotation: Rotation, chunk_bytes: int = 16 * 2**20) -> None:
    """``W <- R^T W`` in place (the output side: each column times ``R``), a slice of columns at a time."""
    cols = max(1, chunk_bytes // (4 * weight.shape[0]))
    for start in range(0, weight.shape[1], cols):
        part = weight[:, start : start + cols]
        part.copy_(rotation.apply(part.float().T).T.to(weight.dtype))
