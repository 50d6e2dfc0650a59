"""The report of a quantization run: per layer and in total, as a rich table or JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .pipeline.unit import LayerResult, QuantState


@dataclass
class QuantizationReport:
    """Per-layer results and totals of a run.

    ``packed_size_bytes`` is what the weights take stored at their exact bits per weight (codes,
    scales, zero-points; everything else at its stored size). ``size_on_disk_bytes`` is what the
    saved checkpoint's weight files really take (``None`` until it is saved): a fake-quantized
    checkpoint keeps the original dtype, so it is as large as the original.
    """

    layers: list[LayerResult]
    size_before_bytes: int
    packed_size_bytes: int
    quantized_params: int
    total_params: int
    seconds: float
    cpu_seconds: float | None = None
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    size_on_disk_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def avg_bits_per_weight(self) -> float:
        """Average over quantized layers, weighted by parameter count (codes, scales, zeros)."""
        if not self.quantized_params:
            return float("nan")
        return sum(r.bits_per_weight * r.numel for r in self.layers) / self.quantized_params

    @property
    def compression(self) -> float:
        """Original size over the packed size."""
        return self.size_before_bytes / max(1, self.packed_size_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "totals": {
                "layers_quantized": len(self.layers),
                "quantized_params": self.quantized_params,
                "total_params": self.total_params,
                "avg_bits_per_weight": _finite(self.avg_bits_per_weight),
                "size_before_bytes": self.size_before_bytes,
                "packed_size_bytes": self.packed_size_bytes,
                "size_on_disk_bytes": self.size_on_disk_bytes,
                "compression": self.compression,
                "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds,
            },
            "timings": self.timings,
            **self.extra,
        }

    def table(self, max_rows: int | None = None):
        """A rich Table: one row per layer, then totals."""
        from rich.table import Table

        show_out = any(r.output_error is not None for r in self.layers)
        show_act = any(r.activations is not None for r in self.layers)
        t = Table(title="lowbit quantization report", show_lines=False)
        t.add_column("layer", overflow="fold")
        t.add_column("method")
        t.add_column("format")
        t.add_column("bits/w", justify="right")
        if show_act:
            t.add_column("inputs")
        t.add_column("rel. weight err", justify="right")
        if show_out:
            t.add_column("output err (RTN)", justify="right")
        t.add_column("time", justify="right")
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        for r in rows:
            cells = [
                r.name,
                r.method + (f" ({r.note})" if r.note else ""),
                r.format,
                f"{r.bits_per_weight:.4f}",
                *([r.activations or "full precision"] if show_act else []),
                f"{r.rel_weight_error:.4f}",
            ]
            if show_out:
                cells.append(_out_err(r))
            cells.append(f"{r.seconds:.2f}s")
            t.add_row(*cells)
        if max_rows is not None and len(self.layers) > max_rows:
            t.add_row(f"... {len(self.layers) - max_rows} more", *[""] * (len(t.columns) - 1))
        disk = "" if self.size_on_disk_bytes is None else f"; on disk {_mb(self.size_on_disk_bytes)}"
        t.caption = (
            f"{len(self.layers)} layers, {self.quantized_params / 1e6:.2f}M of {self.total_params / 1e6:.2f}M params quantized, "
            f"avg {self.avg_bits_per_weight:.4f} bits/weight; {_mb(self.size_before_bytes)} -> packed "
            f"{_mb(self.packed_size_bytes)} ({self.compression:.2f}x){disk}; {self.seconds:.1f}s"
        )
        return t

    def timings_table(self):
        """Where the time went: wall and CPU seconds per phase (a rich Table)."""
        from .pipeline.timing import timings_table

        return timings_table(self.timings, self.seconds, self.cpu_seconds)


def _out_err(r: LayerResult) -> str:
    if r.output_error is None:
        return "-"
    if r.output_error_rtn is None:
        return f"{r.output_error:.3e}"
    return f"{r.output_error:.3e} ({r.output_error_rtn:.3e})"


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def build_report(
    model: nn.Module,
    state: QuantState,
    seconds: float,
    storage_dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
    cpu_seconds: float | None = None,
    timings: dict[str, dict[str, float]] | None = None,
) -> QuantizationReport:
    """Sizes before/after count every parameter: quantized weights at their exact bits per weight,
    everything else at its stored size (``storage_dtype``, e.g. the checkpoint's fp16, when the
    model was loaded in another floating-point type)."""
    before = after = total = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue  # tied weights are stored once
        seen.add(id(p))
        size = p.element_size()
        if storage_dtype is not None and p.is_floating_point():
            size = torch.empty((), dtype=storage_dtype).element_size()
        nbytes = p.numel() * size
        total += p.numel()
        before += nbytes
        r = state.results.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        after += math.ceil(r.bits_per_weight * r.numel / 8) if r is not None else nbytes
    layers = list(state.results.values())
    extra = dict(extra or {})
    if state.tokens_per_expert:
        extra["tokens_per_expert"] = state.tokens_per_expert
    return QuantizationReport(
        layers=layers,
        size_before_bytes=before,
        packed_size_bytes=after,
        quantized_params=sum(r.numel for r in layers),
        total_params=total,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        timings=dict(timings or {}),
        extra=extra,
    )


def weight_files_bytes(directory) -> int:
    """Bytes of a checkpoint directory's weight files (``*.safetensors``, ``*.gguf``)."""
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.suffix in (".safetensors", ".gguf"))
