"""One unit of work for the pipeline: a transformer block (or the head) with its calibration inputs.

Steps see only this object. It lets them pick their layers, run the unit over the calibration
inputs with hooks on some layers, and commit quantized weights. The pipeline owns the data flow
(what the inputs are, where modules live); the steps own the math.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..formats import QuantizedTensor, Quantizer
from ..models import ResolvedGroup, weight_of
from .tensors import to_device

log = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor, tuple, dict], torch.Tensor]


@dataclass
class BlockInputs:
    """Calibration inputs of one unit: per batch, the hidden states plus the other call arguments."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.hidden)

    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] if h.ndim == 3 else h.shape[0] for h in self.hidden)

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        return BlockInputs(hidden, self.args, self.kwargs)


@dataclass
class LayerResult:
    """What happened to one layer; a row of the report."""

    name: str
    method: str
    format: str
    bits_per_weight: float
    numel: int
    shape: tuple[int, ...]
    rel_weight_error: float
    output_error: float | None = None
    output_error_rtn: float | None = None
    seconds: float = 0.0
    note: str = ""
    #: how the layer's inputs are quantized when the model runs (``None``: not at all)
    activations: str | None = None
    activation_bits: int | None = None


@dataclass
class QuantState:
    """Results across all units of a run."""

    results: dict[str, LayerResult] = field(default_factory=dict)
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    keep_codes: bool = True
    on_commit: Callable[[LayerResult], None] | None = None
    #: per MoE experts module: calibration tokens routed to each expert
    tokens_per_expert: dict[str, list[int]] = field(default_factory=dict)


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once everything needed was seen."""


class Unit:
    """A block (or the head) being quantized."""

    def __init__(
        self,
        name: str,
        index: int,
        module: nn.Module,
        linears: dict[str, nn.Module],
        groups: list[ResolvedGroup],
        state: QuantState,
        inputs: BlockInputs | None,
        forward: ForwardFn,
        device: torch.device,
        norm_offset: float = 0.0,
        compute_dtype: torch.dtype | None = None,
    ):
        self.name = name
        self.index = index
        self.module = module
        self.linears = linears
        self.groups = groups
        self.state = state
        self.inputs = inputs
        self._forward = forward
        self.device = device
        #: what the inputs are cast to on their way in (the module computes in it); outputs go
        #: back to the dtype the inputs are kept in
        self.compute_dtype = compute_dtype
        #: norms of this model compute ``x * (norm_offset + weight)`` (Gemma: 1)
        self.norm_offset = norm_offset
        self._prefix = name + "." if name else ""

    # ------------------------------------------------------------------ selection
    def select(self, config, include_quantized: bool = False) -> dict[str, nn.Module]:
        """This unit's linears that ``config`` targets (already-quantized ones left out)."""
        return {
            n: m
            for n, m in self.linears.items()
            if config.selects(n) and (include_quantized or n not in self.state.results)
        }

    def full_name(self, relative: str) -> str:
        return self._prefix + relative

    @property
    def has_calibration(self) -> bool:
        return self.inputs is not None and len(self.inputs) > 0

    # ------------------------------------------------------------------ running
    def batches(self) -> Iterator[tuple[torch.Tensor, tuple, dict]]:
        yield from self._cast(self._calibration())

    def _calibration(self) -> BlockInputs:
        if not self.has_calibration:
            raise RuntimeError(f"{self.name}: no calibration inputs (the recipe's calibrated steps need data)")
        return self.inputs

    def _cast(self, inputs: BlockInputs) -> Iterator[tuple[torch.Tensor, tuple, dict]]:
        dev, dtype = self.device, self.compute_dtype
        for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs):
            yield to_device(h, dev, dtype), to_device(a, dev, dtype), to_device(k, dev, dtype)

    @torch.no_grad()
    def run(self, keep_outputs: bool = True) -> list[torch.Tensor] | None:
        """Run the unit over all calibration batches; outputs (on CPU, in the inputs' dtype) if asked."""
        return self._run(self._calibration(), keep_outputs)

    @torch.no_grad()
    def forward_inputs(self, inputs: BlockInputs) -> list[torch.Tensor]:
        """Run the unit on other inputs (e.g. held-back samples); outputs on CPU, in the inputs' dtype."""
        return self._run(inputs, True)

    def _run(self, inputs: BlockInputs, keep_outputs: bool) -> list[torch.Tensor] | None:
        outs = [] if keep_outputs else None
        for (h, a, k), stored in zip(self._cast(inputs), inputs.hidden):
            y = self._forward(h, a, k)
            if outs is not None:
                outs.append(y.to("cpu", stored.dtype))
        return outs

    @torch.no_grad()
    def collect(self, modules: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None]) -> None:
        """Run the unit with a hook that passes each call's input of ``modules`` to ``on_input``.

        Each batch's forward stops as soon as every hooked module has been called once.
        """
        seen: set[str] = set()
        wanted = set(modules)

        def make_hook(name: str):
            def hook(_mod, args):
                on_input(name, args[0])
                seen.add(name)
                if seen >= wanted:
                    raise StopForward

            return hook

        handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
        try:
            for h, a, k in self.batches():
                seen.clear()
                with contextlib.suppress(StopForward):
                    self._forward(h, a, k)
        finally:
            for handle in handles:
                handle.remove()

    def capture_inputs(self, module: nn.Module) -> list[torch.Tensor]:
        """The input of ``module`` for every calibration batch (on the unit's device)."""
        xs: list[torch.Tensor] = []
        self.collect({"_": module}, lambda _n, x: xs.append(x.detach()))
        return xs

    @torch.no_grad()
    def capture_calls(self, module: nn.Module) -> list[tuple[tuple, dict]]:
        """The (args, kwargs) of every call of ``module`` over the calibration batches (on CPU)."""
        calls: list[tuple[tuple, dict]] = []

        def hook(_mod, args, kwargs):
            calls.append((to_device(args, "cpu"), to_device(kwargs, "cpu")))
            raise StopForward

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for h, a, k in self.batches():
                with contextlib.suppress(StopForward):
                    self._forward(h, a, k)
        finally:
            handle.remove()
        return calls

    # ------------------------------------------------------------------ results
    def commit(
        self,
        name: str,
        module: nn.Module,
        qtensor: QuantizedTensor,
        method: str,
        *,
        seconds: float = 0.0,
        output_error: float | None = None,
        output_error_rtn: float | None = None,
        note: str = "",
    ) -> LayerResult:
        """Replace ``module``'s weight by the dequantized ``qtensor`` and record the result."""
        quantizer = Quantizer(qtensor.spec)
        w = weight_of(module).detach()
        err = ref = 0.0
        # A few rows at a time, overwritten in place once measured: no float32 copy of a big weight.
        with torch.no_grad():
            for start in range(0, w.shape[0], 512):
                a = w[start : start + 512].float()
                b = quantizer.dequantize(qtensor.rows(start, start + 512)).to(w.device)
                err += float((a - b).pow(2).sum())
                ref += float(a.pow(2).sum())
                w[start : start + 512] = b
        rel = (err / max(ref, 1e-30)) ** 0.5
        result = LayerResult(
            name=name,
            method=method,
            format=qtensor.spec.label(),
            bits_per_weight=quantizer.bits_per_weight(tuple(w.shape)),
            numel=w.numel(),
            shape=tuple(w.shape),
            rel_weight_error=rel,
            output_error=output_error,
            output_error_rtn=output_error_rtn,
            seconds=seconds,
            note=note,
        )
        self.state.results[name] = result
        if self.state.keep_codes:
            self.state.quantized[name] = _to_cpu(qtensor)
        if self.state.on_commit is not None:
            self.state.on_commit(result)
        log.debug("%s: %s %s rel.err %.4f", name, method, result.format, rel)
        return result


def _to_cpu(q: QuantizedTensor) -> QuantizedTensor:
    return q.to("cpu")


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
