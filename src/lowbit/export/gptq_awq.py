"""Reading the GPTQ (AutoGPTQ / GPTQModel) and AutoAWQ (GEMM) checkpoint layouts into lowbit's codes.

GPTQ, per linear: ``qweight`` int32 ``[in * bits / 32, out]`` (codes packed along the input
dimension, least significant bits first; 3-bit codes run across word boundaries), ``qzeros`` int32
``[groups, out * bits / 32]`` (packed along the output dimension), ``scales`` ``[groups, out]``,
``g_idx`` ``[in]`` (each input column's group; not ``column // group_size`` after act-order).
``w = (q - z) * s`` with unsigned codes. The original format (``checkpoint_format: gptq``) stores
``z - 1``; ``gptq_v2`` stores ``z``.

AutoAWQ GEMM, per linear: ``qweight`` int32 ``[in, out / 8]`` packed along the *output* dimension,
the eight nibbles of a word holding output columns ``0, 2, 4, 6, 1, 3, 5, 7`` of its group of eight;
``qzeros`` ``[groups, out / 8]`` the same way; ``scales`` ``[groups, out]``; 4-bit only, no offset.

Both become lowbit integer formats with integer zero-points (symmetric GPTQ checkpoints, whose zeros
are all ``2^(bits-1)``, become symmetric formats), so they run in lowbit's packed runtime and export
to GGUF where a llama.cpp type holds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..formats import FormatSpec, QuantizedTensor, make_format, unpack
from .layouts import ExportError, Layout

#: AutoAWQ's nibble order: nibble j of a word holds output column _AWQ_ORDER[j] of its eight
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class _ReadOnly(Layout):
    def layer_tensors(self, q: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise ExportError(f"lowbit reads {self.name} checkpoints; it writes compressed-tensors, GGUF and its own")

    def quantization_config(self, layers, unquantized, activations=None):
        raise ExportError(f"lowbit reads {self.name} checkpoints; it writes compressed-tensors, GGUF and its own")


class GPTQLayout(_ReadOnly):
    name = "gptq"

    def __init__(self, zero_offset: int = 0):
        self.zero_offset = zero_offset  # 1 for the original format, which stores z - 1

    def read_layer(self, leaves: Mapping[str, torch.Tensor], spec: FormatSpec) -> QuantizedTensor:
        bits = spec.bits
        scales = leaves["scales"].float()  # [groups, out]
        groups, out = scales.shape
        words = leaves["qweight"].shape[0]
        cols = words * 32 // bits
        codes = unpack(leaves["qweight"].T.contiguous(), bits, cols, torch.int32)  # [out, in]
        zero = unpack(leaves["qzeros"].contiguous(), bits, out, torch.int32).T.float() + self.zero_offset
        g_idx = leaves.get("g_idx")
        if g_idx is not None:
            g_idx = g_idx.to(torch.int32)
            size = cols // groups
            if torch.equal(g_idx, torch.arange(cols, dtype=torch.int32) // size):
                g_idx = None  # groups in column order: no index needed
        if not spec.has_zero_point:
            if not torch.all(zero == 2 ** (bits - 1)):
                raise ExportError("a symmetric GPTQ checkpoint whose zero-points are not 2^(bits-1)")
            zero = None
        return QuantizedTensor(codes, scales.T.contiguous(), zero, None, spec, (out, cols), g_idx)


class AWQLayout(_ReadOnly):
    name = "awq"

    def read_layer(self, leaves: Mapping[str, torch.Tensor], spec: FormatSpec) -> QuantizedTensor:
        scales = leaves["scales"].float()  # [groups, out]
        out = scales.shape[1]
        logical = torch.tensor([_AWQ_ORDER.index(p) for p in range(8)])  # nibble holding logical column p
        index = (torch.arange(out) // 8 * 8) + logical.repeat(out // 8)

        def columns(packed: torch.Tensor) -> torch.Tensor:
            nibbles = unpack(packed.contiguous(), 4, out, torch.int32)  # [rows, out] in nibble order
            return nibbles[:, index]

        codes = columns(leaves["qweight"]).T.contiguous()  # [out, in]
        zero = columns(leaves["qzeros"]).T.float()
        return QuantizedTensor(codes, scales.T.contiguous(), zero, None, spec, tuple(codes.shape))


def gptq_specs(config: Mapping[str, Any], names: list[str]) -> tuple[Layout, dict[str, FormatSpec]]:
    """The GPTQ layout and every quantized layer's format, from a GPTQ ``quantization_config``."""
    bits = int(config["bits"])
    if bits not in (2, 3, 4, 8):
        raise ExportError(f"GPTQ checkpoints with {bits}-bit codes are not read")
    fmt = str(config.get("checkpoint_format") or config.get("format") or "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ExportError(f"GPTQ checkpoint format {fmt!r} is not read (lowbit reads gptq and gptq_v2)")
    symmetric = bool(config.get("sym", True))
    spec = make_format(
        "int",
        bits=bits,
        group_size=int(config.get("group_size", 128)),
        symmetric=symmetric,
        scale_dtype="float16",
        zero_dtype="int",
    )
    return GPTQLayout(zero_offset=1 if fmt == "gptq" else 0), dict.fromkeys(names, spec)


def awq_specs(config: Mapping[str, Any], names: list[str]) -> tuple[Layout, dict[str, FormatSpec]]:
    bits = int(config.get("bits", config.get("w_bit", 4)))
    version = str(config.get("version", config.get("format", "gemm"))).lower()
    if bits != 4 or version != "gemm":
        raise ExportError(f"AWQ checkpoints are read in the 4-bit GEMM layout, not {bits}-bit {version!r}")
    spec = make_format(
        "int4",
        group_size=int(config.get("group_size", config.get("q_group_size", 128))),
        symmetric=False,
        scale_dtype="float16",
        zero_dtype="int",
    )
    return AWQLayout(), dict.fromkeys(names, spec)
