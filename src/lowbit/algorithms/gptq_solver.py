"""GPTQ's solver (Frantar et al., 2023) for one weight: quantize columns one at a time, pushing
each column's error onto the columns not yet quantized through the inverse Hessian of the layer
inputs.

Faithful to the paper's algorithm: Hessian ``H = 2 X X^T``; dampening by a fraction of the mean
diagonal; the upper Cholesky factor of ``H^-1``; lazy batch updates in blocks of ``block_size``
columns; optional act-order (columns by descending ``diag(H)``) with or without static groups.
Any :class:`~lowbit.formats.Quantizer` serves as the grid (INT, FP4, NF4, MX ...), because the
algorithm only needs "parameters for a group" and "round one column with them". The pipeline
step that collects Hessians and commits layers is :mod:`lowbit.algorithms.gptq`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ..formats import QParams, QuantizedTensor, Quantizer
from .hessian import Hessian, diagonal, inverse_cholesky_factor, permute_rows_, permute_symmetric_
from .packed import PackedSymmetric

log = logging.getLogger(__name__)


@dataclass
class GPTQResult:
    qtensor: QuantizedTensor
    dampening: float
    #: tr(dW Hd dW^T) accumulated by the algorithm itself, with Hd the damped Hessian
    loss: float


def gptq_quantize(
    weight: torch.Tensor,
    H: Hessian,
    quantizer: Quantizer,
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    damping_retries: int = 4,
    overwrite_hessian: bool = False,
    max_working_mib: float | None = None,
    dynamic_groups: str = "updated",
) -> GPTQResult:
    """Quantize ``weight`` (``[out, in]``) given the input Hessian ``H`` (``[in, in]``).

    ``dynamic_groups`` (groups without static parameters): where a group's parameters come from
    when its first column is reached. ``updated``: the weights as the walk has updated them,
    including the error feedback of the earlier columns of the same lazy batch (the weights that
    are then rounded). ``reference``: as the reference implementation (``fasterquant``), from the
    weights before the current lazy batch's feedback. The two agree when every group starts a lazy
    batch (``group_size`` a multiple of ``block_size``, e.g. both 128).

    ``H`` may be packed (:class:`~.packed.PackedSymmetric`, on the CPU): the algorithm then
    works on the triangle. ``overwrite_hessian=True`` lets it use ``H`` as scratch memory
    instead of copying it. ``max_working_mib`` bounds the float32 working copy of the weight:
    rows are then quantized in several passes over the same factor (GPTQ treats rows
    independently; only per-tensor scales need every row, and then there is one pass).
    """
    rows, cols = weight.shape
    spec = quantizer.spec
    quantizer.check_shape(tuple(weight.shape))
    gs = quantizer.group_size_for(cols) if spec.granularity == "group" else None
    packed = isinstance(H, PackedSymmetric)
    if packed:
        if weight.device.type != "cpu":
            raise ValueError("a packed Hessian needs the weight on the CPU")
        if H.dtype != torch.float32:
            H = PackedSymmetric(H.n, H.data.float())
        elif not overwrite_hessian:
            H = H.clone()
    else:
        H = H.detach().to(weight.device, torch.float32)
        if not overwrite_hessian:
            H = H.clone()

    dead = diagonal(H) == 0
    if packed:
        H.set_diagonal_(dead, 1.0)
    else:
        H[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(diagonal(H), descending=True)
        if packed:
            H.permute_(perm)
        else:
            permute_symmetric_(H, perm)
    U, damp_used = inverse_cholesky_factor(H, dampening, damping_retries)
    del H
    log.debug("inverse Hessian factor ready (%d columns)", cols)

    rows_per_pass = rows_within(weight.shape, max_working_mib) if spec.granularity != "tensor" else rows
    # inputs that are always zero: their weights never matter (as the reference does)
    global_scale = quantizer.global_scale_for(weight.detach()[:, ~dead]) if spec.global_scale else None
    fixed_params = gs is None or static_groups

    n_groups = cols // gs if gs else 1
    params = _ParamsOut(rows if spec.granularity != "tensor" else 1, n_groups, weight.device)
    if dynamic_groups not in ("updated", "reference"):
        raise ValueError(f"dynamic_groups must be 'updated' or 'reference', got {dynamic_groups!r}")
    walk = _ColumnWalk(
        U,
        quantizer,
        block_size,
        gs,
        quantizer.param_block(cols),
        perm,
        global_scale,
        params,
        reference_groups=dynamic_groups == "reference",
        group_of_col=[0] * cols,
        losses=torch.zeros(cols, dtype=torch.float64, device=weight.device),
        codes_t=torch.zeros(cols, rows, dtype=torch.uint8, device=weight.device),
    )
    del U
    for r0 in range(0, rows, rows_per_pass):
        r1 = min(r0 + rows_per_pass, rows)
        # Work on the transpose: a column of W is then a contiguous row, and the rank-1 updates
        # touch contiguous memory (several times faster than updating column slices).
        Wt = torch.empty(cols, r1 - r0, dtype=torch.float32, device=weight.device)
        Wt.copy_(weight.detach()[r0:r1].T)
        Wt[dead] = 0.0
        fixed = None
        if fixed_params:  # per-channel/tensor parameters, or static groups: from the original weights
            fixed = _params_of_rows(quantizer, Wt, global_scale)
            params.put(r0, 0, fixed)
        if perm is not None:
            permute_rows_(Wt, perm)
        _quantize_rows(walk, Wt, fixed, r0, r1)
        del Wt
    walk.U = None  # the factor's memory goes back before the codes are reordered
    codes_t, group_of_col = walk.codes_t, walk.group_of_col

    g_idx = None
    if perm is not None:
        codes_t = codes_t[torch.argsort(perm)]
        if gs is not None and not static_groups:
            g_idx = torch.tensor(group_of_col, dtype=torch.int32, device=weight.device)[torch.argsort(perm)]
    qtensor = QuantizedTensor.from_params(
        codes_t.T.contiguous(), params.params(global_scale), spec, tuple(weight.shape), g_idx
    )
    return GPTQResult(qtensor, damp_used, float(walk.losses.sum()))


def _params_of_rows(quantizer: Quantizer, Wt: torch.Tensor, global_scale, chunk: int = 256) -> QParams:
    """Parameters of the rows held transposed in ``Wt``, a few rows at a time: grouping the
    transposed rows copies them, and a copy of all of them would be one more working copy."""
    if quantizer.spec.granularity == "tensor":
        return quantizer.find_params(quantizer.group_view(Wt.T), global_scale)
    parts = [quantizer.find_params(quantizer.group_view(rows.T), global_scale) for rows in Wt.split(chunk, dim=1)]
    return replace(parts[0], **{name: torch.cat([getattr(p, name) for p in parts]) for name, _ in parts[0].grouped()})


class _ParamsOut:
    """Every group's parameters as the walk chooses them: ``[rows, groups]`` per field, allocated
    when the first parameters arrive (which fields a format has: scale, zero or min, super-scales)."""

    def __init__(self, rows: int, groups: int, device: torch.device):
        self.shape, self.device = (rows, groups), device
        self.fields: dict[str, torch.Tensor] = {}

    def put(self, r0: int, g0: int, p: QParams) -> None:
        """Parameters ``[r, k, 1]`` of rows ``r0:r0+r``, groups ``g0:g0+k``."""
        for name, value in p.grouped():
            out = self.fields.get(name)
            if out is None:
                out = self.fields[name] = torch.zeros(self.shape, device=self.device)
            out[r0 : r0 + value.shape[0], g0 : g0 + value.shape[1]] = value[..., 0]

    def params(self, global_scale: torch.Tensor | None) -> QParams:
        return QParams(**{name: v.unsqueeze(-1) for name, v in self.fields.items()}, global_scale=global_scale)


@dataclass
class _ColumnWalk:
    """What every pass of GPTQ's column walk shares: the factor, the grid and the outputs it fills."""

    U: Hessian | None  # upper factor (dense) or its transpose held packed
    quantizer: Quantizer
    block_size: int
    gs: int | None
    #: columns whose parameters are found together without static groups: a group, or a whole
    #: super-block (its groups share one super-scale)
    param_block: int | None
    perm: torch.Tensor | None
    global_scale: torch.Tensor | None
    params: _ParamsOut
    reference_groups: bool
    group_of_col: list[int]
    losses: torch.Tensor
    codes_t: torch.Tensor


def _quantize_rows(walk: _ColumnWalk, Wt: torch.Tensor, fixed: QParams | None, r0: int, r1: int) -> None:
    """GPTQ's column walk over rows ``r0:r1`` (``Wt`` holds them transposed and permuted)."""
    U, quantizer, gs, perm, global_scale = walk.U, walk.quantizer, walk.gs, walk.perm, walk.global_scale
    codes_t, pb = walk.codes_t, walk.param_block
    packed = isinstance(U, PackedSymmetric)
    cols = Wt.shape[0]
    current: QParams | None = None
    first_group = 0
    order = perm.tolist() if perm is not None else None
    if fixed is not None:  # each group's parameters as one column needs them, sliced once
        per_group = [fixed.select(g) for g in range(fixed.scale.shape[1])]
    for i1 in range(0, cols, walk.block_size):
        i2 = min(i1 + walk.block_size, cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U_rows = U.factor_rows(i1, i2) if packed else U[i1:i2, i1:]  # U[i1:i2, i1:]
        U1 = U_rows[:, : i2 - i1]
        pivots = U1.diagonal().tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if gs is None:
                colp, g = per_group[0], 0
            elif fixed is not None:  # static groups: the column's own (original-order) group
                g = (order[col] if order is not None else col) // gs
                colp = per_group[g]
            else:
                g = col // gs
                # A new parameter block: one group, or for K-quants a super-block, whose groups share
                # a super-scale and so are chosen together, all from the weights as they are when the
                # walk reaches the super-block (its later groups then miss the feedback of its earlier
                # columns, as every group does with dynamic_groups="reference").
                if col % pb == 0:
                    if walk.reference_groups:  # without this lazy batch's feedback (Wt lags W1 until the batch ends)
                        window = Wt[col : col + pb]
                    else:  # the weights as updated so far, the ones that are rounded next
                        window = W1[i : i + pb]
                        if window.shape[0] < pb:
                            window = torch.cat([window, Wt[i2 : col + pb]], dim=0)
                    current, first_group = quantizer.find_params(quantizer.group_view(window.T), global_scale), g
                    walk.params.put(r0, g, current)
                if col % gs == 0:
                    colp = current.select(g - first_group)
            walk.group_of_col[col] = g
            w = W1[i]
            c = quantizer.encode(w.unsqueeze(1), colp)[:, 0]
            q = quantizer.decode(c.unsqueeze(1), colp)[:, 0]
            codes_t[col, r0:r1] = c
            err = Err1[i]
            torch.sub(w, q, out=err).div_(pivots[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
        walk.losses[i1:i2] += Err1.double().pow(2).sum(dim=1)  # once per block, not per column
        Wt[i2:].addmm_(U_rows[:, i2 - i1 :].T, Err1, alpha=-1.0)


def rows_within(shape: tuple[int, int], mib: float | None) -> int:
    """How many rows of a ``shape`` weight fit in ``mib`` MiB of float32 (all without a bound)."""
    rows, cols = shape
    return rows if mib is None else max(1, min(rows, int(mib * 2**20) // (4 * cols)))
