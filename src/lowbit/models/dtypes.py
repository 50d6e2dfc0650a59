"""Which dtype a model computes in: its checkpoint's, unless this device has no fast arithmetic for it."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def compute_dtype(storage: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype to run a checkpoint stored in ``storage`` on ``device``: float16 runs in float32 on
    the CPU, the rest as stored. CPUs without fp16 arithmetic run fp16 layers far slower than fp32
    (a 2-core EPYC: linear 60 against 230 GFLOP/s; `lowbit quantize reference-lm --method
    awq+gptq` took 283 s in fp16 and 111 s in fp32, GPTQ alone 35 s and 17 s), at no gain in
    accuracy; bf16 has fast kernels there and stays."""
    if storage == torch.float16 and torch.device(device).type == "cpu":
        return torch.float32
    return storage


def arithmetic_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype to do a block's arithmetic in, for weights held in ``dtype`` on ``device``.

    CPUs without bf16/fp16 instructions run half-precision matmuls through slow fallbacks: on a
    2-core AVX2 EPYC, F.linear at 512 x 2048 x 2048 reaches 168 GFLOP/s in float32 and 21 in bf16
    (fp16: 26), so a bf16 1.1B model's GPTQ spent 78% of its time in bf16 linears. Those CPUs
    compute in float32 (more accurate too); CPUs with AVX512-BF16/FP16 or AMX, and GPUs, keep the
    half type.
    """
    if torch.device(device).type != "cpu" or dtype not in _NATIVE_CPU_FLAGS:
        return dtype
    return dtype if _NATIVE_CPU_FLAGS[dtype] & cpu_flags() else torch.float32


_NATIVE_CPU_FLAGS = {
    torch.bfloat16: {"avx512_bf16", "amx_bf16"},
    torch.float16: {"avx512_fp16", "amx_fp16"},
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux; elsewhere none are known, and half types compute in float32)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()
