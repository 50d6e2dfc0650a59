"""Symmetric matrices stored as one triangle: the Hessians of wide layers at half the memory.

The Hessian of a layer with ``n`` inputs is an ``n x n`` float32 matrix. For an MLP's down
projection (n = 5632 in a 1B Llama, 11008 in a 7B) it is the largest tensor of a whole GPTQ run,
and half of it repeats the other half. :class:`PackedSymmetric` keeps only the lower triangle,
in LAPACK's *rectangular full packed* format (RFP, ``transr='N'``, ``uplo='L'``): ``n(n+1)/2``
values in one buffer, on which LAPACK runs what GPTQ needs most in place and at BLAS-3 speed:
the rank-k updates that accumulate the Hessian (``?sfrk``, which also does half the work of a
full ``X^T X``), and the Cholesky factorisation and inverse (``?pftrf``, ``?pftri``). The rest
(the diagonal, symmetric permutations, bands of columns, rows of a factor) is index arithmetic.

Where element ``(i, j)`` of the lower triangle (``i >= j``) lives in the buffer, with
``k = n // 2``::

    n even ((n+1) x k column-major):  j*(n+1) + i + 1   if j < k   else (i-k)*(n+1) + (j-k)
    n odd  (n x (k+1) column-major):  j*n + i           if j <= k  else (i-k)*n + (j-k-1)
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import torch
from scipy.linalg import lapack

#: rows per band when a computation walks the matrix band by band (a band of an 11008-column
#: matrix is then 11 MiB of values plus as many of positions)
BAND = 256


class PackedSymmetric:
    """A symmetric ``n x n`` float matrix on the CPU, stored as its lower triangle (RFP)."""

    def __init__(self, n: int, data: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        size = n * (n + 1) // 2
        if data is None:
            data = torch.zeros(size, dtype=dtype)
        if data.shape != (size,) or data.device.type != "cpu" or not data.is_contiguous():
            raise ValueError(f"packed data must be a contiguous CPU vector of {size} values, got {tuple(data.shape)}")
        if data.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"packed data must be float32 or float64, got {data.dtype}")
        self.n = n
        self.data = data

    # ------------------------------------------------------------------ basics
    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def clone(self) -> PackedSymmetric:
        return PackedSymmetric(self.n, self.data.clone())

    def index(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Buffer positions of elements ``(i, j)`` (either triangle; broadcasts like ``i + j``)."""
        hi, lo = torch.maximum(i, j), torch.minimum(i, j)
        n, k = self.n, self.n // 2
        if n % 2 == 0:
            return torch.where(lo < k, lo * (n + 1) + hi + 1, (hi - k) * (n + 1) + (lo - k))
        return torch.where(lo <= k, lo * n + hi, (hi - k) * n + (lo - k - 1))

    def _diagonal_index(self) -> torch.Tensor:
        ar = torch.arange(self.n)
        return self.index(ar, ar)

    def diagonal(self) -> torch.Tensor:
        """A copy of the diagonal."""
        return self.data[self._diagonal_index()]

    def add_to_diagonal_(self, value: float | torch.Tensor) -> None:
        idx = self._diagonal_index()
        self.data[idx] = self.data[idx] + value

    def set_diagonal_(self, where: torch.Tensor, value: float) -> None:
        """Set the diagonal entries selected by the boolean mask ``where`` to ``value``."""
        idx = self._diagonal_index()[where]
        self.data[idx] = value

    @classmethod
    def from_dense(cls, H: torch.Tensor) -> PackedSymmetric:
        """Pack the lower triangle of a square matrix (a full-size copy; for small matrices and tests)."""
        n = H.shape[0]
        packed = cls(n, dtype=H.dtype if H.dtype in (torch.float32, torch.float64) else torch.float32)
        i, j = torch.tril_indices(n, n)
        packed.data[packed.index(i, j)] = H[i, j].to(packed.dtype).cpu()
        return packed

    def to_dense(self) -> torch.Tensor:
        """The full symmetric matrix (``n x n``: for small matrices and tests)."""
        return self.columns(0, self.n)

    # ------------------------------------------------------------------ pieces as dense tensors
    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` of the full symmetric matrix (its columns ``a:b``, transposed), dense."""
        positions = np.stack([self.row_positions(r) for r in range(a, b)]) if b > a else np.zeros((0, self.n), int)
        return self.data[torch.from_numpy(positions)]

    def columns(self, a: int, b: int) -> torch.Tensor:
        """Columns ``a:b`` of the full symmetric matrix, as a dense ``n x (b-a)`` tensor."""
        return self.rows(a, b).T

    def factor_rows(self, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` (from column ``a`` on) of ``U = L^T``, for a Cholesky factor ``L`` held in
        the lower triangle: a dense ``(b-a) x (n-a)`` tensor, zero below the diagonal."""
        out = self.rows(a, b)[:, a:]  # row r of L^T is column r of L: element (c, r) of the triangle
        return out.masked_fill_(torch.arange(a, self.n)[None, :] < torch.arange(a, b)[:, None], 0.0)

    def quadratic_forms(self, *mats: torch.Tensor, row_chunk: int = 512) -> list[float]:
        """``tr(M H M^T)`` for each ``M`` (``rows x n``, any float dtype), one band of ``H`` at a
        time: each band is gathered once for all matrices, and rows are converted to float a few
        at a time."""
        totals = [0.0] * len(mats)
        for a in range(0, self.n, BAND):
            b = min(a + BAND, self.n)
            band = self.rows(a, b)  # = columns a:b, transposed
            for m, M in enumerate(mats):
                for rows in M.split(row_chunk):
                    x = rows.to(self.dtype)
                    totals[m] += float(((x @ band.T) * x[:, a:b]).sum())
        return totals

    # ------------------------------------------------------------------ in-place algebra
    def rank_update_(self, x: torch.Tensor, alpha: float, beta: float) -> None:
        """``H = beta * H + alpha * x^T x`` for ``x`` of shape ``m x n`` (LAPACK ``?sfrk``)."""
        x = x.detach().to(device="cpu", dtype=self.dtype).contiguous()
        rank_k = lapack.ssfrk if self.dtype == torch.float32 else lapack.dsfrk
        buf = self.data.numpy()
        # x^T as a Fortran n x m matrix is x's own memory: no copy of the activations
        out = rank_k(self.n, x.shape[0], alpha, x.numpy().T, beta, buf, transr="N", uplo="L", trans="N", overwrite_c=1)
        if not np.shares_memory(out, buf):  # the wrapper had to copy (never seen): keep the result anyway
            buf[:] = out

    def row_positions(self, i: int) -> np.ndarray:
        """Buffer positions of row ``i`` (elements ``(i, 0) ... (i, n-1)``): four arithmetic
        progressions, built without per-element arithmetic (a permutation needs ``n`` of these)."""
        n, half = self.n, self.n // 2
        even = n % 2 == 0
        stride, offset, split = (n + 1, 1, half) if even else (n, 0, half + 1)
        dtype = np.int32 if self.data.numel() < 2**31 else np.int64  # half the memory for the usual sizes
        parts = [
            np.arange(i + offset, i + offset + stride * min(i, split), stride, dtype=dtype)
        ]  # (i, c), c < min(i, split)
        if i > split:
            parts.append(
                np.arange((i - half) * stride, (i - half) * stride + (i - split), dtype=dtype)
            )  # (i, c), split <= c < i
        if i < split:  # (c, i), c >= i
            parts.append(np.arange(i * stride + i + offset, i * stride + n + offset, dtype=dtype))
        else:
            parts.append(
                np.arange((i - half) * stride + i - split, (n - half) * stride + i - split, stride, dtype=dtype)
            )
        return np.concatenate(parts)

    def swap_(self, i: int, j: int) -> None:
        """Swap rows and columns ``i`` and ``j`` (a symmetric transposition) in place."""
        if i == j:
            return
        buf = self.data.numpy()
        pos_i, pos_j = self.row_positions(i), self.row_positions(j)
        row_i, row_j = buf[pos_i], buf[pos_j]  # copies
        diag_i, diag_j, shared = row_i[i], row_j[j], row_i[j]
        row_j[i], row_j[j] = diag_j, shared  # becomes row i: the diagonal entries trade places and
        row_i[j], row_i[i] = diag_i, shared  # element (i, j), its own mirror image, stays
        buf[pos_i] = row_j
        buf[pos_j] = row_i

    def permute_(self, perm: torch.Tensor) -> None:
        """``H = H[perm][:, perm]`` in place, as a sequence of symmetric transpositions."""
        order = perm.tolist()
        position = list(range(self.n))  # where each original index is now
        holder = list(range(self.n))  # which original index each position holds
        for target, wanted in enumerate(order):
            source = position[wanted]
            if source == target:
                continue
            self.swap_(target, source)
            displaced = holder[target]
            holder[source], position[displaced] = displaced, source
            holder[target], position[wanted] = wanted, target

    def cholesky_(self) -> int:
        """``H = L`` with ``H = L L^T`` in the lower triangle (LAPACK ``?pftrf``); 0 on success."""
        return self._lapack("pftrf")

    def cholesky_inverse_(self) -> int:
        """From ``L`` (after :meth:`cholesky_`) to ``H^-1`` in place (LAPACK ``?pftri``); 0 on success."""
        return self._lapack("pftri")

    def _lapack(self, routine: str) -> int:
        fn = getattr(lapack, ("s" if self.dtype == torch.float32 else "d") + routine)
        buf = self.data.numpy()
        out, info = fn(self.n, buf, transr="N", uplo="L", overwrite_a=1)
        if not np.shares_memory(out, buf):
            buf[:] = out
        return int(info)

    def save(self, f: BinaryIO) -> None:
        """Write the values to a (temporary) file, for :meth:`restore_`."""
        f.seek(0)
        self.data.numpy().tofile(f)

    def restore_(self, f: BinaryIO) -> None:
        f.seek(0)
        f.readinto(memoryview(self.data.numpy()).cast("B"))
