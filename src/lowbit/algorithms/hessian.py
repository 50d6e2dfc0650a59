"""Second-order statistics of layer inputs, shared by GPTQ-style methods.

``H = 2/n * sum_i x_i x_i^T`` over the ``n`` calibration tokens a layer sees, accumulated as a
running mean so that the scale does not depend on how tokens were batched. Also the in-place
linear algebra GPTQ-style methods run on it (the upper Cholesky factor of the damped inverse,
symmetric permutations), written so that the largest Hessian of a big model is never copied.
Wide Hessians on the CPU are kept as one triangle (:class:`~.packed.PackedSymmetric`): half the
memory of the largest tensor of a GPTQ run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from typing import TypeVar

import torch

from .packed import PackedSymmetric

log = logging.getLogger(__name__)

#: From this many columns on (a 64 MiB fp32 Hessian), CPU Hessians are packed (one triangle) and
#: factorised in place.
PACKED_MIN_COLUMNS = 4096

Hessian = torch.Tensor | PackedSymmetric
T = TypeVar("T")


def packs(columns: int, device: torch.device | str) -> bool:
    """Whether a Hessian of this many columns is packed by default on this device."""
    return torch.device(device).type == "cpu" and columns >= PACKED_MIN_COLUMNS


def hessian_nbytes(columns: int, device: torch.device | str) -> int:
    """Memory of a float32 Hessian as :class:`HessianAccumulator` holds it by default."""
    return 4 * (columns * (columns + 1) // 2 if packs(columns, device) else columns * columns)


class HessianAccumulator:
    """Running ``2/n X^T X``. ``packed=None`` packs wide CPU Hessians (``PACKED_MIN_COLUMNS``)."""

    def __init__(
        self,
        columns: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        packed: bool | None = None,
    ):
        if packed is None:
            packed = packs(columns, device)
        if packed and torch.device(device).type != "cpu":
            raise ValueError("packed Hessians live on the CPU (LAPACK); use packed=False on other devices")
        self.H: Hessian = (
            PackedSymmetric(columns, dtype=dtype)
            if packed
            else torch.zeros(columns, columns, device=device, dtype=dtype)
        )
        self.tokens = 0

    def add(self, x: torch.Tensor, chunk_mib: float = 8.0) -> None:
        # A few tokens at a time (8 MiB of float32): the float32 copy of a whole batch of wide
        # inputs (an MLP's intermediate activations) would be as large as the Hessian itself.
        columns = self.H.shape[0]
        chunk = max(1, int(chunk_mib * 2**20) // (4 * columns))
        for part in x.detach().reshape(-1, columns).split(chunk):
            part = part.to(device=self.H.device, dtype=self.H.dtype)
            m = part.shape[0]
            keep = self.tokens / (self.tokens + m)
            self.tokens += m
            if isinstance(self.H, PackedSymmetric):
                self.H.rank_update_(part, alpha=2.0 / self.tokens, beta=keep)
            else:
                self.H.mul_(keep)
                self.H.addmm_(part.T, part, alpha=2.0 / self.tokens)  # no scaled copy of x

    def take(self) -> Hessian:
        """Hand over ``H`` (the accumulator no longer holds it), so the taker may overwrite it."""
        H, self.H = self.H, None
        return H


def output_error(delta: torch.Tensor, H: Hessian, chunk: int = 256) -> float:
    """``tr(delta H delta^T)``: the summed squared output error of a weight change ``delta``
    on the calibration inputs (up to the factor 2/n folded into ``H``). Rows are processed in
    chunks so that no second matrix of ``delta``'s size is needed."""
    if isinstance(H, PackedSymmetric):
        return H.quadratic_forms(delta)[0]
    total = 0.0
    for rows in delta.split(chunk):
        d = rows.to(device=H.device, dtype=H.dtype)
        total += float(((d @ H) * d).sum())
    return total


def diagonal(H: Hessian) -> torch.Tensor:
    return H.diagonal() if isinstance(H, PackedSymmetric) else torch.diag(H)


def diagonal_blocks(H: Hessian, size: int) -> torch.Tensor:
    """The ``size x size`` blocks on the diagonal of ``H``, as ``[n / size, size, size]``: the
    covariances of each group of inputs on its own."""
    n = H.shape[0]
    if isinstance(H, PackedSymmetric):
        return torch.stack([H.rows(a, a + size)[:, a : a + size] for a in range(0, n, size)])
    groups = n // size
    return H.reshape(groups, size, groups, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def mean_diagonal(H: Hessian) -> float:
    """Mean of ``diag(H)`` after GPTQ's fix of dead inputs (a zero diagonal entry counts as 1)."""
    d = diagonal(H)
    return float(torch.where(d == 0, torch.ones_like(d), d).mean())


class HessianNotPositiveDefinite(RuntimeError):
    pass


def inverse_cholesky_factor(
    H: Hessian, dampening: float, retries: int, in_place: bool | None = None
) -> tuple[Hessian, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising the damping until it exists.

    Consumes ``H``. A packed ``H`` is factorised in place and returned holding the transpose of
    the factor (read its rows with :meth:`~.packed.PackedSymmetric.factor_rows`). For large dense
    Hessians on the CPU (``in_place=None``: from ``PACKED_MIN_COLUMNS`` on) the three
    factorisations run in place in ``H``'s own memory
    (LAPACK through scipy; torch's linalg always allocates a second matrix), so the Hessian of the
    largest layer of a big model is never held twice. Smaller ones use torch: scipy's OpenBLAS
    threads keep spinning after each call and slowed the next torch operations down, which on a
    model of many small layers cost 20% of a GPTQ run, for a copy worth a few MiB.
    """
    mean_diag = float(torch.mean(diagonal(H)))
    if isinstance(H, PackedSymmetric):
        return _inverse_cholesky_packed(H, mean_diag, dampening, retries)
    if in_place is None:
        in_place = H.shape[0] >= PACKED_MIN_COLUMNS
    if in_place and H.device.type == "cpu" and H.dtype in (torch.float32, torch.float64) and H.is_contiguous():
        return _inverse_cholesky_in_place(H, mean_diag, dampening, retries)
    added = 0.0

    def factorise(damp: float) -> torch.Tensor | None:
        nonlocal added
        H.diagonal().add_(damp * mean_diag - added)
        added = damp * mean_diag
        L, info = torch.linalg.cholesky_ex(H)
        if info != 0:
            return None
        Hinv = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        del Hinv
        return U.contiguous() if info == 0 and torch.isfinite(U).all() else None  # GPTQ walks its rows

    return _raise_damping_until(factorise, dampening, retries)


def _raise_damping_until(factorise: Callable[[float], T | None], dampening: float, retries: int) -> tuple[T, float]:
    """``factorise(damp)`` with ``damp = dampening``, then 10 times more on each retry, until it
    returns a factor (it restores the Hessian itself when it has to)."""
    damp = dampening
    for attempt in range(retries + 1):
        factor = factorise(damp)
        if factor is not None:
            return factor, damp
        if attempt < retries:
            log.info("Hessian not positive definite with dampening %.3g; retrying with %.3g", damp, damp * 10)
            damp *= 10
    raise HessianNotPositiveDefinite(f"Hessian not positive definite even with dampening {damp:.3g}")


def _inverse_cholesky_in_place(
    H: torch.Tensor, mean_diag: float, dampening: float, retries: int
) -> tuple[torch.Tensor, float]:
    from scipy.linalg import lapack

    # H is symmetric, so the Fortran-ordered view of its memory is H itself. LAPACK's "upper"
    # triangle of that view is torch's lower triangle; torch's upper triangle is never touched,
    # which keeps a copy of the Hessian for the retries.
    A = H.numpy().T
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (A,))
    diag = H.diagonal().clone()

    def factorise(damp: float) -> torch.Tensor | None:
        H.diagonal().copy_(diag + damp * mean_diag)
        _, info = potrf(A, lower=0, overwrite_a=1, clean=0)
        if info == 0:
            _, info = potri(A, lower=0, overwrite_c=1)  # upper triangle of the inverse
        if info == 0:
            _, info = potrf(A, lower=0, overwrite_a=1, clean=0)
        # The factor is finite if the sum of the whole matrix is (the Hessian's own half is finite);
        # unlike isfinite, a sum allocates nothing and takes one pass.
        if info == 0 and bool(torch.isfinite(H.sum())):
            # The factor is torch's lower triangle (its upper one still holds the Hessian). GPTQ walks
            # the factor's rows, so move it to the upper triangle: rows are then contiguous in memory.
            _mirror_lower_to_upper(H)
            H.triu_()
            return H
        _mirror_lower_to_upper(H.T)  # the Hessian, from the intact upper triangle, for the retry
        return None

    return _raise_damping_until(factorise, dampening, retries)


def temp_files_in_memory() -> bool:
    """Whether the temporary directory (``TMPDIR``) is a memory file system (tmpfs, ramfs): the
    packed Hessian's backup for damping retries then takes memory, not disk."""
    target = os.path.realpath(tempfile.gettempdir())
    best, fs = "", ""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                inside = len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/"))
                if inside and len(parts[1]) >= len(best):  # the deepest mount point holding TMPDIR
                    best, fs = parts[1], parts[2]
    except OSError:  # not Linux: assume a disk
        return False
    return fs in ("tmpfs", "ramfs")


def _inverse_cholesky_packed(
    H: PackedSymmetric, mean_diag: float, dampening: float, retries: int
) -> tuple[PackedSymmetric, float]:
    # The factorisations overwrite the only copy of the Hessian. A retry needs it back, so it
    # waits in a temporary file (TMPDIR), not in memory: a second copy would cost what packing saved.
    with tempfile.TemporaryFile() if retries > 0 else contextlib.nullcontext() as backup:
        if backup is not None:
            H.save(backup)
        tried = False

        def factorise(damp: float) -> PackedSymmetric | None:
            nonlocal tried
            if tried:
                H.restore_(backup)
            tried = True
            H.add_to_diagonal_(damp * mean_diag)
            # the factor L' of H^-1 = L' L'^T is the transpose of the upper factor GPTQ walks
            ok = H.cholesky_() == 0 and H.cholesky_inverse_() == 0 and H.cholesky_() == 0
            return H if ok and bool(torch.isfinite(H.data.sum())) else None  # a sum allocates nothing

        return _raise_damping_until(factorise, dampening, retries)


def _mirror_lower_to_upper(H: torch.Tensor, chunk: int = 512) -> None:
    """Copy the lower triangle onto the upper one (transposed), a band of columns at a time."""
    n = H.shape[0]
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        H[:a, a:b] = H[a:b, :a].T
        block = H[a:b, a:b]
        block.copy_(block.tril() + block.tril(-1).T)


def permute_rows_(T: torch.Tensor, perm: torch.Tensor) -> None:
    """``T[:] = T[perm]`` in place, following the cycles of the permutation (one row of scratch)."""
    order = perm.tolist()
    done = [False] * len(order)
    for start in range(len(order)):
        if done[start]:
            continue
        done[start] = True
        if order[start] == start:
            continue
        saved = T[start].clone()
        i = start
        while order[i] != start:
            T[i] = T[order[i]]
            i = order[i]
            done[i] = True
        T[i] = saved


def permute_symmetric_(H: torch.Tensor, perm: torch.Tensor, chunk: int = 256) -> None:
    """``H[:] = H[perm][:, perm]`` without a second matrix of H's size."""
    permute_rows_(H, perm)
    for a in range(0, H.shape[0], chunk):  # then columns, a band of rows at a time
        H[a : a + chunk] = H[a : a + chunk, perm]
