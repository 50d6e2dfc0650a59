"""GPTQ (Frantar et al., 2023): quantize columns one at a time, pushing each column's error onto
the columns not yet quantized through the inverse Hessian of the layer inputs.

Faithful to the paper's algorithm: Hessian ``H = 2 X X^T``; dampening by a fraction of the mean
diagonal; the upper Cholesky factor of ``H^-1``; lazy batch updates in blocks of ``block_size``
columns; optional act-order (columns by descending ``diag(H)``) with or without static groups.
Any :class:`~lowbit.formats.Quantizer` serves as the grid (INT, FP4, NF4, MX ...), because the
algorithm only needs "parameters for a group" and "round one column with them".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..formats import QParams, QuantizedTensor, Quantizer
from ..models import weight_of
from .base import Step, WeightQuantConfig, register_step
from .hessian import (
    Hessian,
    HessianAccumulator,
    HessianNotPositiveDefinite,
    diagonal,
    hessian_nbytes,
    inverse_cholesky_factor,
    mean_diagonal,
    output_error,
    permute_rows_,
    permute_symmetric_,
)
from .packed import PackedSymmetric

log = logging.getLogger(__name__)


class GPTQConfig(WeightQuantConfig):
    """GPTQ options (besides the format).

    Attributes:
        block_size: columns per lazy batch update.
        dampening: added to ``diag(H)`` as a fraction of its mean (the paper's ``percdamp``).
        act_order: quantize columns in order of decreasing ``diag(H)`` (on by default, as in
            llm-compressor and GPTQModel).
        static_groups: with act-order, compute every group's parameters up front from the
            original weights, so groups stay contiguous (no ``g_idx`` needed at inference; on by
            default). Off, groups follow the act-order and a ``g_idx`` maps columns to groups.
        true_sequential: within a block, quantize layer groups in execution order (q/k/v, then o,
            then gate/up, then down), collecting each group's inputs after the earlier ones were
            quantized.
        damping_retries: when ``H`` is not positive definite, multiply the dampening by 10 up
            to this many times before falling back to RTN for that layer.
        min_tokens: layers that saw fewer calibration tokens (e.g. rarely routed experts) are
            quantized data-free with ``fallback`` instead.
        fallback: the data-free method for those layers (``hqq`` needs an asymmetric integer
            format; otherwise ``rtn`` is used).
        max_working_mib: bound on GPTQ's float32 working copy of a weight; larger weights are
            quantized a band of rows at a time (same codes: rows are independent given the
            factor; each extra pass repeats the per-column work). ``None``: only where it lowers
            the block's peak: a layer's working copy may add at most a quarter of the block's
            largest Hessian to its own Hessian (in a Llama, down_proj takes 3 passes, the others one).
    """

    block_size: int = 128
    dampening: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    damping_retries: int = 4
    min_tokens: int = 16
    fallback: Literal["rtn", "hqq"] = "rtn"
    max_working_mib: float | None = Field(default=None, gt=0)


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
) -> GPTQResult:
    """Quantize ``weight`` (``[out, in]``) given the input Hessian ``H`` (``[in, in]``).

    ``H`` may be packed (:class:`~.packed.PackedSymmetric`, on the CPU): the algorithm then
    works on the triangle. ``overwrite_hessian=True`` lets it use ``H`` as scratch memory
    instead of copying it. ``max_working_mib`` bounds the float32 working copy of the weight:
    rows are then quantized in several passes over the same factor (GPTQ treats rows
    independently; only per-tensor scales need every row, and then there is one pass).
    """
    rows, cols = weight.shape
    spec = quantizer.spec
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
    scale = torch.zeros(rows if spec.granularity != "tensor" else 1, n_groups, device=weight.device)
    zero = torch.zeros_like(scale) if spec.has_zero_point else None
    group_of_col = [0] * cols
    losses = torch.zeros(cols, dtype=torch.float64, device=weight.device)
    codes_t = torch.zeros(cols, rows, dtype=torch.uint8, device=weight.device)
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
            scale[r0 : r0 + fixed.scale.shape[0]] = fixed.scale[..., 0]
            if zero is not None:
                zero[r0 : r0 + fixed.zero.shape[0]] = fixed.zero[..., 0]
        if perm is not None:
            permute_rows_(Wt, perm)
        _quantize_rows(
            Wt,
            U,
            packed,
            quantizer,
            block_size,
            gs,
            perm,
            fixed,
            global_scale,
            r0,
            r1,
            scale,
            zero,
            group_of_col,
            losses,
            codes_t,
        )
        del Wt
    del U

    g_idx = None
    if perm is not None:
        codes_t = codes_t[torch.argsort(perm)]
        if gs is not None and not static_groups:
            g_idx = torch.tensor(group_of_col, dtype=torch.int32, device=weight.device)[torch.argsort(perm)]
    qtensor = QuantizedTensor(
        codes=codes_t.T.contiguous(),
        scale=scale,
        zero=zero,
        global_scale=global_scale,
        spec=spec,
        shape=tuple(weight.shape),
        g_idx=g_idx,
    )
    return GPTQResult(qtensor, damp_used, float(losses.sum()))


def _params_of_rows(quantizer: Quantizer, Wt: torch.Tensor, global_scale, chunk: int = 256) -> QParams:
    """Parameters of the rows held transposed in ``Wt``, a few rows at a time: grouping the
    transposed rows copies them, and a copy of all of them would be one more working copy."""
    if quantizer.spec.granularity == "tensor":
        return quantizer.find_params(quantizer.group_view(Wt.T), global_scale)
    parts = [quantizer.find_params(quantizer.group_view(rows.T), global_scale) for rows in Wt.split(chunk, dim=1)]
    zero = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
    return QParams(torch.cat([p.scale for p in parts]), zero, global_scale)


def _quantize_rows(
    Wt,
    U,
    packed,
    quantizer,
    block_size,
    gs,
    perm,
    fixed,
    global_scale,
    r0,
    r1,
    scale,
    zero,
    group_of_col,
    losses,
    codes_t,
) -> None:
    """GPTQ's column walk over rows ``r0:r1`` (``Wt`` holds them transposed and permuted)."""
    cols = Wt.shape[0]
    current: QParams | None = None
    order = perm.tolist() if perm is not None else None
    if fixed is not None:  # each group's parameters as one column needs them, sliced once
        per_group = [
            QParams(fixed.scale[:, g], None if fixed.zero is None else fixed.zero[:, g], fixed.global_scale)
            for g in range(fixed.scale.shape[1])
        ]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
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
                if col % gs == 0:  # a new group: parameters from the current, already-updated weights
                    window = W1[i : i + gs]
                    if window.shape[0] < gs:
                        window = torch.cat([window, Wt[i2 : col + gs]], dim=0)
                    current = quantizer.find_params(window.T.unsqueeze(1), global_scale)
                    scale[r0:r1, g] = current.scale[:, 0, 0]
                    if zero is not None:
                        zero[r0:r1, g] = current.zero[:, 0, 0]
                    colp = QParams(
                        current.scale[:, 0], None if current.zero is None else current.zero[:, 0], global_scale
                    )
            group_of_col[col] = g
            w = W1[i]
            c = quantizer.encode(w.unsqueeze(1), colp)[:, 0]
            q = quantizer.decode(c.unsqueeze(1), colp)[:, 0]
            codes_t[col, r0:r1] = c
            err = Err1[i]
            torch.sub(w, q, out=err).div_(pivots[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
        losses[i1:i2] += Err1.double().pow(2).sum(dim=1)  # once per block, not per column
        Wt[i2:].addmm_(U_rows[:, i2 - i1 :].T, Err1, alpha=-1.0)


def rows_within(shape: tuple[int, int], mib: float | None) -> int:
    """How many rows of a ``shape`` weight fit in ``mib`` MiB of float32 (all without a bound)."""
    rows, cols = shape
    return rows if mib is None else max(1, min(rows, int(mib * 2**20) // (4 * cols)))


def working_bound_mib(H: Hessian, largest_hessian: int, share: float = 0.25) -> float:
    """The working-copy bound that keeps a layer's (Hessian + fp32 weight) within the block's
    largest Hessian plus ``share`` of it (never below 1 MiB)."""
    own = H.data.numel() * 4 if isinstance(H, PackedSymmetric) else H.numel() * 4
    return max(1.0, ((1 + share) * largest_hessian - own) / 2**20)


def _rtn_and_base_errors(W: torch.Tensor, H: Hessian, quantizer: Quantizer, chunk: int = 512):
    """RTN's output error and squared norm, and the weight's own, ``chunk`` rows at a time (scales
    are per row or per group of a row, so rows quantize independently; per-tensor scales need all
    rows). A packed ``H`` is gathered band by band once per chunk, for both matrices at once."""
    step = W.shape[0] if quantizer.spec.granularity == "tensor" else chunk
    packed = isinstance(H, PackedSymmetric)
    rtn_err = rtn_norm = base_err = base_norm = 0.0
    for rows in W.split(step):
        w = rows.float()
        delta = quantizer.dequantize(quantizer.quantize(w)).to(w.device)
        delta.sub_(w).neg_()  # w - rtn(w), without another matrix of this size
        if packed:
            e_rtn, e_base = H.quadratic_forms(delta, w)
            rtn_err, base_err = rtn_err + e_rtn, base_err + e_base
        else:
            rtn_err += output_error(delta, H)
            base_err += output_error(w, H)
        rtn_norm += float(delta.pow(2).sum())
        base_norm += float(w.pow(2).sum())
    return rtn_err, rtn_norm, base_err, base_norm


def layer_subsets(unit, selected: dict[str, nn.Module], sequential: bool) -> list[list[list[str]]]:
    """Selected layers as execution-ordered subsets; each subset is a list of input-sharing groups.

    Consecutive groups of the same stage (e.g. all experts' gate/up) form one subset: they are
    independent, so one calibration pass serves them all.
    """
    if not sequential:
        return [[[n] for n in selected]]
    subsets: list[list[list[str]]] = []
    placed: set[str] = set()
    last_stage = None
    for group in unit.groups:
        names = [unit.full_name(rel) for rel in group.linears if unit.full_name(rel) in selected]
        if not names:
            continue
        if group.stage is not None and group.stage == last_stage:
            subsets[-1].append(names)
        else:
            subsets.append([names])
        last_stage = group.stage
        placed.update(names)
    rest = [[n] for n in selected if n not in placed]
    if rest:
        subsets.append(rest)
    return subsets


@register_step
class GPTQ(Step):
    """GPTQ weight quantization (needs calibration data)."""

    name = "gptq"
    Config = GPTQConfig
    needs_calibration = True
    quantizes_weights = True

    def apply(self, unit) -> None:
        cfg: GPTQConfig = self.config
        quantizer = Quantizer(cfg.spec)
        selected = unit.select(cfg)
        if not selected:
            return
        if not unit.has_calibration:
            self._fallback(unit, selected, quantizer, "no calibration inputs reach this layer")
            return
        # The block's peak is its largest Hessian plus that layer's working copy of the weight.
        largest_hessian = max(hessian_nbytes(weight_of(m).shape[1], unit.device) for m in selected.values())
        for subset in layer_subsets(unit, selected, cfg.true_sequential):
            # Layers that share an input share one Hessian: hook only the first of each group.
            accumulators = {}
            leaders = {}
            for names in subset:
                first = names[0]
                accumulators[first] = HessianAccumulator(weight_of(selected[first]).shape[1], unit.device)
                leaders[first] = selected[first]
            unit.collect(leaders, lambda n, x, acc=accumulators: acc[n].add(x))
            log.debug("collected inputs of %s", ", ".join(leaders))
            for names in subset:
                acc = accumulators.pop(names[0])
                for i, name in enumerate(names):
                    # the last layer of a group may consume the Hessian (no copy of the largest matrix)
                    self._quantize_layer(
                        unit, name, selected[name], acc, quantizer, i == len(names) - 1, largest_hessian
                    )
                del acc

    def _quantize_layer(
        self,
        unit,
        name: str,
        module: nn.Module,
        acc: HessianAccumulator,
        quantizer: Quantizer,
        last: bool,
        largest_hessian: int,
    ) -> None:
        cfg: GPTQConfig = self.config
        if acc.tokens < cfg.min_tokens:
            self._fallback(
                unit, {name: module}, quantizer, f"layer saw {acc.tokens} calibration tokens (< {cfg.min_tokens})"
            )
            return
        start = time.perf_counter()
        W = weight_of(module).detach()
        # Errors are reported on the damped Hessian GPTQ minimises; RTN's is measured before H is consumed.
        bound = cfg.max_working_mib or working_bound_mib(acc.H, largest_hessian)
        # Errors in chunks of half the rows GPTQ works on at once (RTN's temporaries take two more
        # float32 copies of a chunk): their memory then stays within the same bound.
        chunk = rows_within(tuple(W.shape), bound / 2) if isinstance(acc.H, PackedSymmetric) else 512
        rtn_err, rtn_norm, base_err, base_norm = _rtn_and_base_errors(W, acc.H, quantizer, chunk)
        mean_diag = mean_diagonal(acc.H)
        try:
            # no local reference to the Hessian: GPTQ may then reuse its memory
            res = gptq_quantize(
                W,
                acc.take() if last else acc.H,
                quantizer,
                cfg.block_size,
                cfg.dampening,
                cfg.act_order,
                cfg.static_groups,
                cfg.damping_retries,
                overwrite_hessian=last,
                max_working_mib=bound,
            )
        except HessianNotPositiveDefinite as exc:
            log.warning("%s: %s; falling back to RTN", name, exc)
            self._fallback(unit, {name: module}, quantizer, "Hessian not positive definite")
            return
        if not (torch.isfinite(res.qtensor.scale).all() and torch.isfinite(torch.tensor(res.loss))):
            log.warning("%s: GPTQ produced non-finite values; falling back to RTN", name)
            self._fallback(unit, {name: module}, quantizer, "non-finite GPTQ result")
            return
        lam = res.dampening * mean_diag
        base = max(base_err + lam * base_norm, 1e-30)
        note = f"damp {res.dampening:g}" if res.dampening != cfg.dampening else ""
        unit.commit(
            name,
            module,
            res.qtensor,
            self.name,
            seconds=time.perf_counter() - start,
            output_error=res.loss / base,
            output_error_rtn=(rtn_err + lam * rtn_norm) / base,
            note=note,
        )

    def _fallback(self, unit, layers: dict[str, nn.Module], quantizer: Quantizer, reason: str) -> None:
        spec = quantizer.spec
        use_hqq = (
            self.config.fallback == "hqq" and spec.kind == "int" and not spec.symmetric and spec.zero_dtype != "int"
        )
        for name, module in layers.items():
            start = time.perf_counter()
            method = "hqq" if use_hqq else "rtn"
            log.warning("%s: %s; using %s", name, reason, method.upper())
            w = weight_of(module).detach().float()
            if use_hqq:
                from .hqq import HQQConfig, hqq_quantize

                qt = hqq_quantize(w, quantizer, HQQConfig(format=spec))
            else:
                qt = quantizer.quantize(w)
            unit.commit(name, module, qt, method, seconds=time.perf_counter() - start, note=f"GPTQ fallback: {reason}")
