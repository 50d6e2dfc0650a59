"""Checking a recipe against a model before any heavy work, and estimating what a run will cost.

Everything here works on a weightless skeleton (shapes only), so ``--dry-run`` answers in seconds
even for models larger than memory.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..algorithms.base import EstimateInputs, Step, match_name
from ..formats import Quantizer
from ..models import ModelAdapter, in_features, out_features, weight_of

log = logging.getLogger(__name__)


class NonFiniteError(ValueError):
    """NaN or Inf in weights or activations."""


class PlanError(ValueError):
    """The recipe cannot be applied to this model (found before any heavy work)."""


def mark_followers(steps: Sequence[Step], layer_names: Sequence[str]) -> None:
    """Tell each step whether a later quantizer step targets any of the same layers."""
    for i, step in enumerate(steps):
        later = [s for s in steps[i + 1 :] if s.quantizes_weights]
        step.followed_by_quantizer = any(
            s.config.selects(n) and step.config.selects(n) for s in later for n in layer_names
        )


def rounding_steps(steps: Sequence[Step], layers: Sequence[str]) -> dict[str, Step]:
    """For each layer, the last step that rounds it (its format is the layer's: AWQ followed by GPTQ
    only scales, GPTQ rounds); layers no step rounds are left out."""
    out = {}
    for name in layers:
        for step in reversed(steps):
            if step.quantizes_weights and step.config.selects(name) and getattr(step.config, "spec", None):
                out[name] = step
                break
    return out


def all_linears(adapter: ModelAdapter) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for i in range(len(adapter)):
        out.update(adapter.block_linears(i))
    out.update(adapter.outside_linears())
    return out


def check_plan(adapter: ModelAdapter, steps: Sequence[Step], allow_nonfinite: bool = False) -> dict[str, nn.Module]:
    """Validate every targeted layer against every step; return the targeted layers.

    Weights that are not loaded yet (streaming) are checked for NaN/Inf when their block loads.
    """
    linears = all_linears(adapter)
    targeted = {n: m for n, m in linears.items() if any(s.config.selects(n) for s in steps)}
    for step in steps:
        for pattern in step.config.targets:
            if pattern not in ("*", "re:.*") and not any(step.config.selects(n) for n in linears):
                _check_pattern_hits_non_linear(adapter.model, pattern, step.name)
        spec = getattr(step.config, "spec", None)
        if spec is None:
            continue
        q = Quantizer(spec)
        for name, mod in linears.items():
            if step.config.selects(name):
                try:
                    q.group_size_for(in_features(mod))
                except ValueError as exc:
                    raise PlanError(f"step {step.name!r}, layer {name}: {exc}") from None
    if not targeted:
        raise PlanError("the recipe targets no Linear layer of this model (check targets/ignore)")
    check_finite_weights({n: m for n, m in targeted.items() if weight_of(m).device.type != "meta"}, allow_nonfinite)
    return targeted


def check_finite_weights(layers: dict[str, nn.Module], allow_nonfinite: bool) -> None:
    for name, mod in layers.items():
        w = weight_of(mod)
        if torch.isfinite(w.sum(dtype=torch.float64)) or torch.isfinite(w).all():
            continue
        bad = int((~torch.isfinite(w)).sum())
        if not allow_nonfinite:
            raise NonFiniteError(
                f"layer {name} has {bad} NaN/Inf weights; fix the checkpoint or pass allow_nonfinite "
                "(--allow-nonfinite) to replace them by 0"
            )
        log.warning("layer %s: replacing %d NaN/Inf weights by 0", name, bad)
        with torch.no_grad():
            w.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _check_pattern_hits_non_linear(model: nn.Module, pattern: str, step: str) -> None:
    for name, mod in model.named_modules():
        if name and match_name(name, pattern):
            raise PlanError(
                f"step {step!r}: target {pattern!r} matches {name} ({type(mod).__name__}), "
                "but lowbit quantizes Linear and Conv1D layers only"
            )


# ----------------------------------------------------------------------------- estimates
@dataclass
class LayerPlan:
    name: str
    shape: tuple[int, int]
    method: str
    format: str
    bits_per_weight: float


@dataclass
class Plan:
    blocks: int
    layers: list[LayerPlan]
    params_total: int
    checkpoint_bytes: int
    packed_bytes: int
    peak_memory_bytes: int
    disk_bytes: int
    seconds: float
    calibration_tokens: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "blocks": self.blocks,
            "layers": [vars(layer) for layer in self.layers],
            "params_total": self.params_total,
            "output_checkpoint_bytes": self.checkpoint_bytes,
            "packed_bytes": self.packed_bytes,
            "estimated_peak_memory_bytes": self.peak_memory_bytes,
            "estimated_disk_bytes": self.disk_bytes,
            "estimated_seconds": self.seconds,
            "calibration_tokens": self.calibration_tokens,
            "notes": self.notes,
        }

    def table(self):
        from rich.table import Table

        t = Table(title="lowbit plan (dry run)")
        t.add_column("what")
        t.add_column("value", justify="right")
        by_method: dict[tuple[str, str], list[LayerPlan]] = {}
        for layer in self.layers:
            by_method.setdefault((layer.method, layer.format), []).append(layer)
        t.add_row("blocks", str(self.blocks))
        for (method, fmt), layers in by_method.items():
            n = sum(math.prod(layer.shape) for layer in layers)
            bpw = sum(layer.bits_per_weight * math.prod(layer.shape) for layer in layers) / n
            t.add_row(f"{method} {fmt}", f"{len(layers)} layers, {n / 1e6:.1f}M weights, {bpw:.4f} bits/weight")
        t.add_row("output checkpoint (fake-quant, original dtype)", _gib(self.checkpoint_bytes))
        t.add_row("packed size (codes + scales)", _gib(self.packed_bytes))
        t.add_row("calibration tokens", str(self.calibration_tokens))
        t.add_row("estimated peak memory", _gib(self.peak_memory_bytes))
        t.add_row("estimated disk needed", _gib(self.disk_bytes))
        t.add_row("estimated time", f"{self.seconds / 60:.1f} min")
        if self.notes:
            t.caption = "; ".join(self.notes)
        return t


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def measured_gflops(dtype: torch.dtype = torch.float32) -> float:
    """Throughput of this machine in ``dtype`` for what a model's linear layers do (about a tenth of
    a second to measure).

    1024 x 1024 operands: small ones under-report what a model's matmuls reach by 3-5x on CPUs
    with bf16 instructions, and bf16 runs there several times faster than fp32. Through
    ``F.linear``, as the layers call it: on CPUs without fp16 arithmetic, ``a @ b`` in fp16 takes
    a path 40x slower than ``linear`` (1.3 against 60 GFLOP/s on a 2-core EPYC).
    """
    n = 1024
    gen = torch.Generator().manual_seed(0)  # not the caller's global random state
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.nn.functional.linear(a, b)
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < 0.05:
        torch.nn.functional.linear(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def estimate(
    adapter: ModelAdapter,
    steps: Sequence[Step],
    targeted: dict[str, nn.Module],
    storage_dtype: torch.dtype,
    calibration_tokens: int,
    streaming: bool,
    out_dir: Path | None = None,
    held_back_tokens: int = 0,
    generate_tokens: int = 0,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    activation_dtype: torch.dtype | None = None,
) -> Plan:
    """``generate_tokens``: the sanity check's greedy generation, one pass over the weights of the
    original and one of the quantized model per token. ``compute_dtype``: what blocks compute
    in (default: ``storage_dtype``); ``activation_dtype``: what calibration activations are kept in
    between blocks (default: ``compute_dtype``)."""
    compute_dtype = compute_dtype or storage_dtype
    elem = torch.empty((), dtype=storage_dtype).element_size()
    compute_elem = torch.empty((), dtype=compute_dtype).element_size()
    act_elem = torch.empty((), dtype=activation_dtype or compute_dtype).element_size()
    layers = []
    for name, step in rounding_steps(steps, targeted).items():
        mod = targeted[name]
        spec = step.config.spec
        shape = (out_features(mod), in_features(mod))
        layers.append(LayerPlan(name, shape, step.name, spec.label(), Quantizer(spec).bits_per_weight(shape)))
    params_total = sum(p.numel() for p in {id(p): p for p in adapter.model.parameters()}.values())
    quantized_numel = sum(math.prod(layer.shape) for layer in layers)
    packed = int(
        sum(layer.bits_per_weight * math.prod(layer.shape) / 8 for layer in layers)
        + (params_total - quantized_numel) * elem
    )
    checkpoint = params_total * elem
    block_params = max(sum(p.numel() for p in b.parameters()) for b in adapter.blocks)
    block_bytes = block_params * compute_elem
    hidden = getattr(adapter.model.config, "hidden_size", 0) or 0
    needs_data = any(s.needs_calibration for s in steps)
    act = 2 * (calibration_tokens + 2 * held_back_tokens) * hidden * act_elem if needs_data else 0
    # Each step states its own cost (its working memory, block passes and arithmetic).
    shapes = {name: (out_features(mod), in_features(mod)) for name, mod in targeted.items()}
    device = str(device or "cpu")
    step_costs = [
        step.estimate(
            EstimateInputs(
                layers={n: shape for n, shape in shapes.items() if step.config.selects(n)},
                block_params=block_params,
                blocks=len(adapter),
                calibration_tokens=calibration_tokens if step.needs_calibration else 0,
                device=torch.device(device).type,
            )
        )
        for step in steps
    ]
    work = max((cost.memory_bytes for cost in step_costs), default=0)
    # Measured on a 2-core CPU box: imports, tokenizer and model code hold about 0.40 GiB before any
    # tensor work, 0.45 GiB while running (benchmarks/results/memory_phases.md).
    runtime = 460 * 2**20
    if streaming:
        # Blocks: one block, its calibration activations, the largest working set of a step.
        # Outside the blocks (the sanity check's generation, writing): one block and the largest of
        # the embeddings and the head, one at a time (all of them if a quantized head stays in memory).
        outside_sizes = [
            sum(p.numel() for p in m.parameters(recurse=False)) * compute_elem
            for m in adapter.outside_modules().values()
        ]
        head_targeted = any(not name.startswith(adapter.blocks_path + ".") for name in targeted)
        outside_peak = sum(outside_sizes) if head_targeted else max(outside_sizes, default=0)
        peak = int(runtime + block_bytes + act + max(work, outside_peak))
    else:
        peak = int(runtime + checkpoint + act + work)
    disk = checkpoint + (act if streaming else 0)
    fp32_rate = measured_gflops(torch.float32)  # the steps' own linear algebra
    # calibration forwards run in the model's dtype
    model_rate = fp32_rate if compute_dtype == torch.float32 else measured_gflops(compute_dtype)
    passes = (1 if needs_data else 0) + sum(cost.block_passes for cost in step_costs)  # 1: propagation
    forward_flops = 2 * block_params * calibration_tokens * passes * len(adapter)
    seconds = forward_flops / (model_rate * 1e9) + sum(cost.flops for cost in step_costs) / (fp32_rate * 1e9)
    seconds += quantized_numel / 50e6  # rounding and bookkeeping per weight
    dtype_name = str(compute_dtype).removeprefix("torch.")
    rates = f"{fp32_rate:.0f} GFLOP/s (float32)"
    if compute_dtype != torch.float32:
        rates = f"{model_rate:.0f} GFLOP/s ({dtype_name}) and " + rates
    notes = [f"{rates} measured on this machine"]
    if generate_tokens:
        # streamed runs read every block again per token (about 1 GB/s from disk or page cache)
        per_pass = checkpoint / 1e9 if streaming else 0.0
        seconds += 2 * generate_tokens * (per_pass + 2 * params_total * 32 / (model_rate * 1e9))
        notes.append(f"sanity check generates {generate_tokens} tokens (2 x {generate_tokens} passes over the weights)")
    if out_dir is not None:
        existing = Path(out_dir).resolve()
        while not existing.exists():  # the output's parents may not exist yet
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if free < disk:
            raise PlanError(f"not enough disk space for {out_dir}: about {_gib(disk)} needed, {_gib(free)} free")
        notes.append(f"{_gib(free)} free on the output disk")
    return Plan(len(adapter), layers, params_total, checkpoint, packed, peak, disk, seconds, calibration_tokens, notes)
