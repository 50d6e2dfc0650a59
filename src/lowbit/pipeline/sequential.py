"""The sequential pipeline: calibrate and quantize one transformer block at a time.

Order (as in GPTQ and llm-compressor): capture the inputs of the first block, then for each
block run every recipe step on it and feed the block's outputs (by default those of the
*quantized* block) to the next. Only the block being worked on needs to sit on the compute
device; the rest of the model stays where it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..algorithms.base import Step
from ..calibration import CalibrationData, CalibrationError
from ..formats import Quantizer
from ..models import ModelAdapter, in_features, weight_of
from .progress import ProgressReporter
from .tensors import first_tensor, to_device
from .unit import BlockInputs, QuantState, StopForward, Unit

log = logging.getLogger(__name__)


@dataclass
class PipelineOptions:
    """How the pipeline runs.

    Attributes:
        device: where each block is processed (default: CUDA when available, else CPU).
        batch_size: calibration sequences per forward pass.
        propagate: feed the next block the ``quantized`` block's outputs (GPTQ's order) or the
            full-precision (``fp``) ones.
        keep_codes: keep the integer codes and scales of every layer (for export).
        allow_nonfinite: replace NaN/Inf weights by 0 (with a warning) instead of refusing.
        progress: show progress bars.
    """

    device: str | None = None
    batch_size: int = 8
    propagate: Literal["quantized", "fp"] = "quantized"
    keep_codes: bool = True
    allow_nonfinite: bool = False
    progress: bool = True

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class NonFiniteError(ValueError):
    """NaN or Inf in weights or activations."""


class PlanError(ValueError):
    """The recipe cannot be applied to this model (found before any heavy work)."""


def mark_followers(steps: Sequence[Step], layer_names: Sequence[str]) -> None:
    """Tell each step whether a later quantizer step targets any of the same layers."""
    for i, step in enumerate(steps):
        later = [s for s in steps[i + 1 :] if s.quantizes_weights]
        step.followed_by_quantizer = any(s.config.selects(n) and step.config.selects(n) for s in later for n in layer_names)


def check_plan(adapter: ModelAdapter, steps: Sequence[Step], options: PipelineOptions) -> dict[str, nn.Module]:
    """Validate every targeted layer against every quantizer step; return the targeted layers."""
    all_linears: dict[str, nn.Module] = {}
    for i in range(len(adapter)):
        all_linears.update(adapter.block_linears(i))
    all_linears.update(adapter.outside_linears())
    targeted = {n: m for n, m in all_linears.items() if any(s.config.selects(n) for s in steps)}
    for step in steps:
        for pattern in step.config.targets:
            if pattern not in ("*", "re:.*") and not any(step.config.selects(n) for n in all_linears):
                _check_pattern_hits_non_linear(adapter.model, pattern, step.name)
        spec = getattr(step.config, "spec", None)
        if spec is None:
            continue
        q = Quantizer(spec)
        for name, mod in all_linears.items():
            if step.config.selects(name):
                try:
                    q.group_size_for(in_features(mod))
                except ValueError as exc:
                    raise PlanError(f"step {step.name!r}, layer {name}: {exc}") from None
    for name, mod in targeted.items():
        w = weight_of(mod)
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            if not options.allow_nonfinite:
                raise NonFiniteError(
                    f"layer {name} has {bad} NaN/Inf weights; fix the checkpoint or pass allow_nonfinite "
                    "(--allow-nonfinite) to replace them by 0"
                )
            log.warning("layer %s: replacing %d NaN/Inf weights by 0", name, bad)
            with torch.no_grad():
                w.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if not targeted:
        raise PlanError("the recipe targets no Linear layer of this model (check targets/ignore)")
    return targeted


def _check_pattern_hits_non_linear(model: nn.Module, pattern: str, step: str) -> None:
    from ..algorithms.base import match_name

    for name, mod in model.named_modules():
        if name and match_name(name, pattern):
            raise PlanError(
                f"step {step!r}: target {pattern!r} matches {name} ({type(mod).__name__}), "
                "but lowbit quantizes Linear and Conv1D layers only"
            )


class _CaptureDone(Exception):
    pass


@torch.no_grad()
def capture_first_block_inputs(
    model: nn.Module, adapter: ModelAdapter, calibration: CalibrationData, options: PipelineOptions
) -> BlockInputs:
    """Run the model up to the first block for every calibration batch; keep that block's inputs."""
    device = options.resolved_device()
    first = adapter.blocks[0]
    hidden, args, kwargs = [], [], []

    def hook(_mod, a, kw):
        kw = dict(kw)
        h = a[0] if a else kw.pop("hidden_states")
        hidden.append(h.detach().to("cpu"))
        args.append(to_device(tuple(a[1:]), "cpu"))
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        kwargs.append(to_device(kw, "cpu"))
        raise _CaptureDone

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    moved = _move_outside_blocks(model, adapter, device)
    try:
        for batch in calibration.batches(options.batch_size):
            batch = to_device(batch, device)
            try:
                try:
                    model(**batch, use_cache=False)
                except TypeError:
                    model(**batch)
            except _CaptureDone:
                pass
    finally:
        handle.remove()
        _move_back(moved)
    if not hidden:
        raise CalibrationError("calibration produced no inputs for the first block")
    return BlockInputs(hidden, args, kwargs)


def _move_outside_blocks(model: nn.Module, adapter: ModelAdapter, device: torch.device) -> list:
    moved = []
    prefix = adapter.blocks_path + "."
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(prefix) and t.device != device:
            moved.append((t, t.data))
            t.data = t.data.to(device)
    return moved


def _move_back(moved: list) -> None:
    for t, data in moved:
        t.data = data


def _block_forward(block: nn.Module):
    def forward(h: torch.Tensor, a: tuple, kw: dict) -> torch.Tensor:
        return first_tensor(block(h, *a, **kw))

    return forward


def _head_forward(norm: nn.Module | None, head: nn.Module):
    def forward(h: torch.Tensor, a: tuple, kw: dict) -> torch.Tensor:
        return head(norm(h) if norm is not None else h)

    return forward


def run_pipeline(
    model: nn.Module,
    steps: Sequence[Step],
    calibration: CalibrationData | None = None,
    options: PipelineOptions | None = None,
    state: QuantState | None = None,
) -> QuantState:
    """Apply ``steps`` to ``model`` in place, block by block. Returns the per-layer results."""
    options = options or PipelineOptions()
    adapter = ModelAdapter(model)
    targeted = check_plan(adapter, steps, options)
    mark_followers(steps, list(targeted))
    needs_data = [s.name for s in steps if s.needs_calibration]
    if needs_data and calibration is None:
        raise CalibrationError(f"step(s) {', '.join(needs_data)} need calibration data; pass calibration=...")
    state = state or QuantState(keep_codes=options.keep_codes)
    device = options.resolved_device()
    inputs = capture_first_block_inputs(model, adapter, calibration, options) if needs_data else None
    if inputs is not None:
        log.info("calibration: %d batches, %d tokens into block 0", len(inputs), inputs.tokens())

    head_linears = {n: m for n, m in adapter.outside_linears().items() if n in targeted}
    to_quantize = [n for n in targeted if any(s.quantizes_weights and s.config.selects(n) for s in steps)]
    with ProgressReporter(options.progress, total=len(to_quantize), description="quantizing layers") as progress:
        state.on_commit = lambda result: progress.advance(result.name)
        for index in range(len(adapter)):
            block = adapter.blocks[index]
            name = adapter.block_name(index)
            start = time.perf_counter()
            original_device = next(block.parameters()).device
            block.to(device)
            unit = Unit(
                name=name,
                index=index,
                module=block,
                linears=adapter.block_linears(index),
                groups=adapter.groups(index),
                state=state,
                inputs=inputs,
                forward=_block_forward(block),
                device=device,
                norm_offset=adapter.arch.norm_offset,
            )
            fp_outputs = unit.run() if inputs is not None and options.propagate == "fp" else None
            for step in steps:
                progress.update(f"block {index + 1}/{len(adapter)}: {step.name}")
                step.apply(unit)
            if inputs is not None:
                outputs = fp_outputs if fp_outputs is not None else unit.run()
                _check_activations(outputs, name)
                inputs = inputs.with_hidden(outputs)
            block.to(original_device)
            log.info("%s done in %.2fs", name, time.perf_counter() - start)

        if head_linears:
            norm_name, norm = adapter.final_norm()
            head_name, head = adapter.lm_head()
            forward = _head_forward(norm, head) if head is not None else None
            head_inputs = inputs if forward is not None else None
            unit = Unit(
                name="",
                index=len(adapter),
                module=model,
                linears=head_linears,
                groups=[],
                state=state,
                inputs=head_inputs,
                forward=forward or _no_forward,
                device=device,
            )
            moved = [(m, next(m.parameters()).device) for m in (norm, head) if m is not None]
            for m, _ in moved:
                m.to(device)
            for step in steps:
                progress.update(f"head: {step.name}")
                step.apply(unit)
            for m, dev in moved:
                m.to(dev)
    state.on_commit = None
    for step in steps:
        step.finish()
    return state


def _no_forward(h, a, kw):
    raise StopForward


def _check_activations(outputs: list[torch.Tensor], block: str) -> None:
    for out in outputs:
        if not torch.isfinite(out).all():
            raise NonFiniteError(
                f"{block} produced NaN/Inf activations on the calibration data; the block (or its quantization) "
                "is numerically broken"
            )
