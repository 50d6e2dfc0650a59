"""GPTQ (Frantar et al., 2023) as a pipeline step: collect each layer group's input Hessian block
by block, quantize its layers with the solver (:mod:`lowbit.algorithms.gptq_solver`), fall back
to a data-free method where GPTQ cannot run, and report each layer's output error next to RTN's.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..formats import Quantizer
from ..models import weight_of
from .base import EstimateInputs, Step, StepEstimate, WeightQuantConfig, register_step
from .gptq_solver import gptq_quantize, rows_within
from .hessian import (
    Hessian,
    HessianAccumulator,
    HessianNotPositiveDefinite,
    hessian_nbytes,
    mean_diagonal,
    output_error,
    packs,
    temp_files_in_memory,
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
        dynamic_groups: without static groups, where each group's parameters come from when the
            walk reaches it: ``updated`` (lowbit's: the weights after the error feedback of every
            earlier column, the ones then rounded) or ``reference`` (the paper's code: before the
            feedback of the current lazy batch). They differ only when groups start inside a lazy
            batch (``block_size`` larger than ``group_size``).
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
    dynamic_groups: Literal["updated", "reference"] = "updated"
    true_sequential: bool = True
    damping_retries: int = 4
    min_tokens: int = 16
    fallback: Literal["rtn", "hqq"] = "rtn"
    max_working_mib: float | None = Field(default=None, gt=0)


def working_bound_mib(H: Hessian, largest_hessian: int, share: float = 0.25) -> float:
    """The working-copy bound that keeps a layer's (Hessian + fp32 weight) within the block's
    largest Hessian plus ``share`` of it (never below 1 MiB)."""
    return max(1.0, ((1 + share) * largest_hessian - H.nbytes) / 2**20)


def _rtn_and_base_errors(W: torch.Tensor, H: Hessian, quantizer: Quantizer, chunk: int = 512) -> tuple[float, float]:
    """RTN's output error and the weight's own squared output, ``chunk`` rows at a time (scales
    are per row or per group of a row, so rows quantize independently; per-tensor scales need all
    rows). A packed ``H`` is gathered band by band once per chunk, for both matrices at once."""
    step = W.shape[0] if quantizer.spec.granularity == "tensor" else chunk
    packed = isinstance(H, PackedSymmetric)
    rtn_err = base_err = 0.0
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
    return rtn_err, base_err


def _squared_change(W: torch.Tensor, qtensor, quantizer: Quantizer, chunk: int) -> float:
    """``||W - dequantize(qtensor)||^2``, a few rows at a time."""
    total = 0.0
    for start in range(0, W.shape[0], chunk):
        rows = quantizer.dequantize(qtensor.rows(start, start + chunk)).to(W.device)
        total += float((W[start : start + chunk].float() - rows).pow(2).sum(dtype=torch.float64))
    return total


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

    def writes_group_index(self) -> bool:
        cfg: GPTQConfig = self.config
        return cfg.act_order and not cfg.static_groups and cfg.spec.granularity == "group"

    def integer_zero_points(self) -> bool:
        return self.config.fallback != "hqq"  # layers that fall back to HQQ get fractional zeros

    def estimate(self, inputs: EstimateInputs) -> StepEstimate:
        """The widest layer's Hessian (packed on the CPU from 4096 inputs), the working copy of the
        largest weight as the row-pass rule bounds it, and its codes; the column walk and the
        factorisations; three partial block passes (collection in execution order, then errors)."""
        hessian = hessian_nbytes(inputs.widest_input, inputs.device)
        largest = inputs.largest
        work = min(largest * 4, hessian // 4) + largest
        # a packed Hessian waits in TMPDIR for damping retries: memory too when TMPDIR is a tmpfs
        if self.config.damping_retries and packs(inputs.widest_input, inputs.device) and temp_files_in_memory():
            work += hessian
        flops = sum(2 * rows * cols**2 + cols**3 for rows, cols in inputs.layers.values())
        return StepEstimate(memory_bytes=hessian + work, block_passes=3.0, flops=flops)

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
        # The report's output errors are those on the calibration inputs (the plain Hessian). RTN's is
        # measured before GPTQ consumes H; GPTQ's follows from the loss it accumulates on the damped
        # Hessian: tr(dW (H + lam I) dW^T) = tr(dW H dW^T) + lam ||dW||^2.
        bound = cfg.max_working_mib or working_bound_mib(acc.H, largest_hessian)
        # Errors in chunks of half the rows GPTQ works on at once (RTN's temporaries take two more
        # float32 copies of a chunk): their memory then stays within the same bound.
        chunk = rows_within(tuple(W.shape), bound / 2) if isinstance(acc.H, PackedSymmetric) else 512
        rtn_err, base_err = _rtn_and_base_errors(W, acc.H, quantizer, chunk)
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
                dynamic_groups=cfg.dynamic_groups,
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
        base = max(base_err, 1e-30)
        gptq_err = max(res.loss - lam * _squared_change(W, res.qtensor, quantizer, chunk), 0.0)
        note = f"damp {res.dampening:g}" if res.dampening != cfg.dampening else ""
        unit.commit(
            name,
            module,
            res.qtensor,
            self.name,
            seconds=time.perf_counter() - start,
            output_error=gptq_err / base,
            output_error_rtn=rtn_err / base,
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
