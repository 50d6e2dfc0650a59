"""lowbit's own packed layout: every lowbit format, stored losslessly and read back by :func:`lowbit.load`.

Per quantized linear (beside the model's other tensors, which stay dense):

- ``weight_codes`` uint8 ``[out, ceil(in * bits / 8)]``: each row's codes as one little-endian bit
  stream (:func:`lowbit.formats.pack`);
- ``weight_scale`` ``[out, groups]`` (``[1, 1]`` per tensor) in the dtype the format rounds scales to:
  float32/float16/bfloat16, float8_e4m3fn (NVFP4), or uint8 biased exponents (E8M0, the MX formats);
- ``weight_zero`` (asymmetric formats) ``[out, groups]``: zero-points, or mins (``zero_style="min"``),
  in the format's float zero dtype, else float32 (integers: exact);
- ``weight_super_scale`` / ``weight_super_min`` float16 ``[out, super_blocks]`` (llama.cpp's K-quants,
  whose ``weight_scale`` and ``weight_zero`` are then small integers, stored as float32);
- ``weight_global_scale`` float32 ``[1]`` (NVFP4's second-level scale);
- ``weight_g_idx`` int32 ``[in]`` when columns are grouped out of order (GPTQ act-order);
- ``weight_shape`` int64 ``[out, in]``.

``config.json`` gets ``quantization_config = {"quant_method": "lowbit", "version": 1, "formats":
{id: FormatSpec}, "layers": {name: id}}``. Nothing is lost: reading the tensors back gives the same
codes and parameters, hence bit-identical dequantized weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..formats import FormatSpec, QuantizedTensor, make_format, pack, packed_length, unpack
from ..formats.activations import ActivationScheme
from .layouts import ExportError, Layout, register_layout

LAYOUT_VERSION = 1
_FLOAT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _scale_to_storage(scale: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    if spec.scale_dtype == "e8m0":
        return (torch.log2(scale).round() + 127).to(torch.uint8)
    if spec.scale_dtype == "e4m3":
        return scale.to(torch.float8_e4m3fn)
    return scale.to(_FLOAT.get(spec.scale_dtype, torch.float32))  # integer scales (K-quants): exact in float32


def _scale_from_storage(stored: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    if spec.scale_dtype == "e8m0":
        return torch.exp2(stored.float() - 127)
    return stored.float()


@register_layout
class LowbitPackedLayout(Layout):
    holds_activations = True
    name = "lowbit"

    def layer_tensors(self, q: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        spec = q.spec
        if len(q.shape) != 2:
            raise ExportError(f"lowbit's packed layout stores 2-D weights, got shape {q.shape}")
        out = {
            "weight_codes": pack(q.codes, spec.bits, torch.uint8),
            "weight_scale": _scale_to_storage(q.scale, spec),
            "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64),
        }
        if q.zero is not None:
            out["weight_zero"] = q.zero.to(_FLOAT.get(spec.zero_dtype, torch.float32))
        for name in ("super_scale", "super_min"):
            if getattr(q, name) is not None:
                out[f"weight_{name}"] = getattr(q, name).to(torch.float16)
        if q.global_scale is not None:
            out["weight_global_scale"] = q.global_scale.float().reshape(1)
        if q.g_idx is not None:
            out["weight_g_idx"] = q.g_idx.to(torch.int32)
        return out

    def read_layer(self, leaves: Mapping[str, torch.Tensor], spec: FormatSpec) -> QuantizedTensor:
        shape = tuple(int(d) for d in leaves["weight_shape"].tolist())
        rows, cols = shape
        packed = leaves["weight_codes"]
        if tuple(packed.shape) != (rows, packed_length(cols, spec.bits, torch.uint8)):
            raise ExportError(
                f"weight_codes has shape {tuple(packed.shape)}, not what {shape} in {spec.bits} bits needs"
            )
        zero, g_idx = leaves.get("weight_zero"), leaves.get("weight_g_idx")
        global_scale = leaves.get("weight_global_scale")
        super_scale, super_min = leaves.get("weight_super_scale"), leaves.get("weight_super_min")
        return QuantizedTensor(
            codes=unpack(packed, spec.bits, cols),
            scale=_scale_from_storage(leaves["weight_scale"], spec),
            zero=None if zero is None else zero.float(),
            global_scale=None if global_scale is None else global_scale.float().reshape(()),
            spec=spec,
            shape=shape,
            g_idx=None if g_idx is None else g_idx.to(torch.int32),
            super_scale=None if super_scale is None else super_scale.float(),
            super_min=None if super_min is None else super_min.float(),
        )

    def quantization_config(
        self,
        layers: Mapping[str, FormatSpec],
        unquantized: list[str],
        activations: Mapping[str, ActivationScheme] | None = None,
    ) -> dict[str, Any]:
        ids: dict[FormatSpec, str] = {}
        for spec in layers.values():
            ids.setdefault(spec, f"f{len(ids)}")
        config = {
            "quant_method": "lowbit",
            "version": LAYOUT_VERSION,
            "formats": {fid: spec.model_dump(mode="json", exclude_defaults=True) for spec, fid in ids.items()},
            "layers": {name: ids[spec] for name, spec in sorted(layers.items())},
        }
        if activations:
            config["input_activations"] = {
                name: scheme.model_dump(mode="json", exclude_defaults=True)
                for name, scheme in sorted(activations.items())
            }
        return config


def activation_schemes_of(config: Mapping[str, Any]) -> dict[str, ActivationScheme]:
    """Layer name -> how it quantizes its inputs, from a lowbit ``quantization_config``."""
    return {name: ActivationScheme(**args) for name, args in config.get("input_activations", {}).items()}


def specs_of(config: Mapping[str, Any]) -> dict[str, FormatSpec]:
    """Layer name -> format, from a lowbit ``quantization_config``."""
    if config.get("version") != LAYOUT_VERSION:
        raise ExportError(f"lowbit packed layout version {config.get('version')!r} is not {LAYOUT_VERSION}")
    formats = {fid: make_format(dict(spec)) for fid, spec in config["formats"].items()}
    return {name: formats[fid] for name, fid in config["layers"].items()}
