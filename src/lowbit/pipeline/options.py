"""How the pipeline runs: :class:`PipelineOptions`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..models.dtypes import arithmetic_dtype
from .sanity import SanityThresholds


@dataclass
class PipelineOptions:
    """How the pipeline runs.

    Attributes:
        device: where each block is processed (default: CUDA when available, else CPU).
        batch_size: calibration sequences per forward pass.
        propagate: feed the next block the ``quantized`` block's outputs (GPTQ's order) or the
            full-precision (``fp``) ones.
        keep_codes: keep the integer codes and scales of every layer in ``result.quantized`` (for
            export); off by default, because one uint8 code per weight is half the size of a
            bf16 model.
        allow_nonfinite: replace NaN/Inf weights by 0 (with a warning) instead of refusing.
        progress: show progress bars.
        sanity_samples: calibration samples held back to compare the quantized model with the
            original before saving (causal LMs; 0 turns the check off).
        sanity: thresholds of that check.
        sanity_generate: new tokens of the check's greedy generation (0: none). Each costs one
            pass over the weights of both models (read again from disk in streaming runs).
        moe_route_all: during calibration, run every token through every expert of MoE blocks
            (their outputs still combine only the routed experts), so that every expert gets
            statistics.
        compute_dtype: what blocks compute in while they are worked on (default:
            :func:`~lowbit.models.dtypes.arithmetic_dtype` of the model's dtype: float32 for bf16/fp16
            models on CPUs without half-precision instructions, where it runs about 8x faster).
            Calibration activations stay in the model's dtype between blocks.
        tune_allocator: in streaming runs, make glibc return freed memory to the system at once
            (:mod:`.memory`). It changes the process's allocator for good (glibc cannot restore
            its adaptive default), so it is off in the library; the CLI turns it on for
            checkpoints of 1 GiB and more, where it lowers the peak (1.1B GPTQ: 1.7 to 0.7 GiB).
            On small models it only costs time: reference-lm GPTQ 19 s without, 27 s with.
    """

    device: str | None = None
    batch_size: int = 8
    propagate: Literal["quantized", "fp"] = "quantized"
    keep_codes: bool = False
    allow_nonfinite: bool = False
    progress: bool = True
    sanity_samples: int = 4
    sanity: SanityThresholds = field(default_factory=SanityThresholds)
    sanity_generate: int = 8
    moe_route_all: bool = False
    tune_allocator: bool = False
    compute_dtype: torch.dtype | None = None

    def arithmetic_dtype(self, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
        """What to compute in for tensors held in ``dtype`` on ``device`` (default: this run's
        device): :attr:`compute_dtype` if set, else the device's rule."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        return arithmetic_dtype(dtype, device if device is not None else self.resolved_device())

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
