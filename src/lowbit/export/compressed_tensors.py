"""The compressed-tensors layout, which vLLM and transformers (with the ``compressed-tensors``
package) load as a quantized model.

What lowbit's formats become (tensor names per linear, next to ``config.json``'s
``quantization_config``; written from compressed-tensors 0.19/0.20's definitions):

- integer formats, 1-8 bits, per group / channel / tensor, symmetric or asymmetric with integer
  zero-points: ``pack-quantized``. ``weight_packed`` int32 ``[out, ceil(in*b/32)]``, each row one
  little-endian bit stream of the unsigned codes (which are compressed-tensors' signed codes plus
  ``2^(b-1)``: the same numbers); ``weight_scale`` ``[out, groups]``; ``weight_zero_point`` (asymmetric
  only) the unsigned zero-points packed the same way along the *output* dimension,
  ``[ceil(out*b/32), groups]``; ``weight_shape`` ``[out, in]``.
- read only: ``int-quantized`` (llm-compressor's W8A8): ``weight`` int8 holding the signed codes.
- FP8 E4M3 per channel or tensor: ``naive-quantized`` (compressed-tensors' name for weight-only FP8):
  ``weight`` float8_e4m3fn and ``weight_scale``.
- NVFP4: ``nvfp4-pack-quantized``: ``weight_packed`` uint8 (two E2M1 codes per byte, the even element
  in the low nibble), ``weight_scale`` float8_e4m3fn per 16, ``weight_global_scale`` fp32, by which
  compressed-tensors *divides* (lowbit multiplies by its reciprocal).
- MXFP4 / MXFP8: ``mxfp4-pack-quantized`` / ``mxfp8-quantized`` with E8M0 scales as biased uint8
  exponents.

Scales are written in the dtype lowbit rounded them to (``scale_dtype``), so a loader's
``(q - z) * s`` reproduces lowbit's values. compressed-tensors 0.19 dropped ``g_idx``: layers whose
columns are grouped out of order (GPTQ act-order without static groups) cannot be stored, nor can
fractional zero-points (HQQ) or formats it does not define (NF4, FP6, lookup tables, binary,
ternary): those use lowbit's own layout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from ..formats import FormatSpec, QuantizedTensor, pack, unpack
from ..formats.activations import ActivationScheme
from ..models import LINEAR_TYPES
from .layouts import ExportError, Layout, register_layout

_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _ct_format(spec: FormatSpec) -> str | None:
    """The compressed-tensors format name that holds ``spec`` exactly, or ``None``."""
    if spec.super_block is not None or spec.zero_style != "code":  # llama.cpp's two-level and min formats
        return None
    if spec.kind == "int" and spec.granularity in ("group", "channel", "tensor") and spec.scale_dtype in _SCALE_DTYPES:
        if spec.has_zero_point and spec.zero_dtype not in ("int", *_SCALE_DTYPES):
            return None
        return "pack-quantized"
    if spec.kind != "fp":
        return None
    if spec.element == "e4m3" and spec.granularity in ("channel", "tensor") and spec.scale_dtype in _SCALE_DTYPES:
        return "naive-quantized"
    if spec.granularity != "group":
        return None
    if spec.element == "e2m1" and spec.group_size == 16 and spec.scale_dtype == "e4m3" and spec.global_scale:
        return "nvfp4-pack-quantized"
    if spec.element == "e2m1" and spec.group_size == 32 and spec.scale_dtype == "e8m0":
        return "mxfp4-pack-quantized"
    if spec.element == "e4m3" and spec.group_size == 32 and spec.scale_dtype == "e8m0":
        return "mxfp8-quantized"
    return None


def _weights_args(spec: FormatSpec) -> dict[str, Any]:
    """compressed-tensors' ``QuantizationArgs`` of ``spec`` (as a dict)."""
    fmt = _ct_format(spec)
    strategy = {"group": "group", "channel": "channel", "tensor": "tensor"}[spec.granularity]
    args: dict[str, Any] = {
        "num_bits": spec.bits,
        "type": "int" if spec.kind == "int" else "float",
        "symmetric": not spec.has_zero_point,
        "strategy": strategy,
        "group_size": spec.group_size if spec.granularity == "group" else None,
        "dynamic": False,
    }
    if spec.has_zero_point:
        args["zp_dtype"] = "torch.int8"
    if fmt == "nvfp4-pack-quantized":
        args.update(strategy="tensor_group", scale_dtype="torch.float8_e4m3fn")
    elif fmt in ("mxfp4-pack-quantized", "mxfp8-quantized"):
        args["scale_dtype"] = "torch.uint8"
    return args


@register_layout
class CompressedTensorsLayout(Layout):
    name = "compressed-tensors"
    holds_activations = True

    def check(
        self, layer: str, spec: FormatSpec, module: torch.nn.Module, step: Any = None, q: QuantizedTensor | None = None
    ) -> None:
        if _ct_format(spec) is None:
            raise ExportError(
                f"{layer}: compressed-tensors has no format for {spec.label()} "
                "(it holds INT 1-8 bit, FP8 E4M3, NVFP4, MXFP4, MXFP8); save it with --save-format lowbit"
            )
        if not isinstance(module, torch.nn.Linear) and isinstance(module, LINEAR_TYPES):
            raise ExportError(
                f"{layer}: compressed-tensors quantizes nn.Linear modules, not {type(module).__name__}; "
                "save it with --save-format lowbit"
            )
        if step is not None and spec.has_zero_point and not step.integer_zero_points():
            raise ExportError(
                f"{layer}: {step.name} chooses fractional zero-points, which compressed-tensors cannot store "
                "(its zero-points are integers); save it with --save-format lowbit"
            )
        if (step is not None and step.writes_group_index()) or (q is not None and q.g_idx is not None):
            raise ExportError(
                f"{layer}: compressed-tensors (0.19 and later) has no g_idx for columns grouped out of order; "
                "use GPTQ with static_groups: true (the default), or --save-format lowbit"
            )
        if q is not None and q.zero is not None and not torch.equal(q.zero, q.zero.round()):
            raise ExportError(
                f"{layer}: fractional zero-points (HQQ), which compressed-tensors cannot store "
                "(its zero-points are integers); save it with --save-format lowbit"
            )

    def check_activation(self, scheme: ActivationScheme) -> None:
        if scheme.spec.granularity == "group":
            # compressed-tensors rounds MX block scales to the nearest power of two (lowbit: the OCP
            # rule, floor) and needs a calibrated global scale for NVFP4 inputs
            raise ExportError(
                f"compressed-tensors loaders would compute {scheme.format} activations differently from lowbit; "
                "save with --save-format lowbit"
            )

    def layer_tensors(self, q: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        spec = q.spec
        fmt = _ct_format(spec)
        if q.g_idx is not None:
            raise ExportError("compressed-tensors cannot store a g_idx (columns grouped out of order)")
        codes = q.codes
        if fmt == "pack-quantized":
            out = {
                "weight_packed": pack(codes, spec.bits, torch.int32),
                "weight_scale": _scale_in(_per_row(q.scale, q.shape[0]), spec, dtype),
                "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64),
            }
            if q.zero is not None:
                zero = _per_row(q.zero, q.shape[0])
                if not torch.equal(zero, zero.round()):
                    raise ExportError("compressed-tensors stores integer zero-points; these are fractional (HQQ?)")
                out["weight_zero_point"] = pack(zero.to(torch.int64).T, spec.bits, torch.int32).T.contiguous()
            return out
        if fmt == "naive-quantized":
            return {
                "weight": codes.contiguous().view(torch.float8_e4m3fn),
                "weight_scale": _scale_in(_per_row(q.scale, q.shape[0]), spec, dtype),
            }
        if fmt == "nvfp4-pack-quantized":
            return {
                "weight_packed": pack(codes, 4, torch.uint8),
                "weight_scale": q.scale.to(torch.float8_e4m3fn),
                "weight_global_scale": (1.0 / q.global_scale.float()).reshape(1),
            }
        exponents = (torch.log2(q.scale).round() + 127).to(torch.uint8)  # E8M0: powers of two
        if fmt == "mxfp4-pack-quantized":
            return {"weight_packed": pack(codes, 4, torch.uint8), "weight_scale": exponents}
        return {"weight": codes.contiguous().view(torch.float8_e4m3fn), "weight_scale": exponents}

    def read_layer(self, leaves: Mapping[str, torch.Tensor], spec: FormatSpec) -> QuantizedTensor:
        fmt = _ct_format(spec)
        if fmt is None:
            raise ExportError(f"compressed-tensors has no format for {spec.label()}")
        if "weight_packed" in leaves and fmt == "pack-quantized":
            rows, cols = (int(d) for d in leaves["weight_shape"].tolist())
        else:
            rows = leaves["weight_packed" if "weight_packed" in leaves else "weight"].shape[0]
            cols = leaves["weight"].shape[1] if "weight" in leaves else 2 * leaves["weight_packed"].shape[1]
        scale = leaves["weight_scale"]
        zero = global_scale = None
        if fmt == "pack-quantized" and "weight_packed" not in leaves:
            # "int-quantized" (llm-compressor's W8A8): the signed codes as an int8 tensor, zero-points
            # (if any) signed int8 [rows, groups]; lowbit's unsigned codes are those plus 2^(b-1)
            offset = 1 << (spec.bits - 1)
            codes = (leaves["weight"].to(torch.int16) + offset).to(torch.uint8)
            if "weight_zero_point" in leaves:
                zero = leaves["weight_zero_point"].float().reshape(rows, -1) + offset
            scale = scale.float()
        elif fmt == "pack-quantized":
            codes = unpack(leaves["weight_packed"], spec.bits, cols, torch.int32)
            if "weight_zero_point" in leaves:
                zero = unpack(leaves["weight_zero_point"].T.contiguous(), spec.bits, rows, torch.int32).T.float()
            scale = scale.float()
        elif fmt in ("naive-quantized", "mxfp8-quantized"):
            codes = leaves["weight"].contiguous().view(torch.uint8)
        else:
            codes = unpack(leaves["weight_packed"], 4, cols, torch.uint8)
        if fmt in ("mxfp4-pack-quantized", "mxfp8-quantized"):
            scale = torch.exp2(scale.float() - 127)
        elif fmt == "nvfp4-pack-quantized":
            global_scale = (1.0 / leaves["weight_global_scale"].float()).reshape(())
        scale = scale.float().reshape(rows, -1) if scale.numel() > 1 or rows == 1 else scale.float().reshape(1, 1)
        return QuantizedTensor(codes, scale, zero, global_scale, spec, (rows, cols))

    def quantization_config(
        self,
        layers: Mapping[str, FormatSpec],
        unquantized: list[str],
        activations: Mapping[str, ActivationScheme] | None = None,
    ) -> dict[str, Any]:
        """One config group per (weight format, input activation scheme): the most common one targets
        every ``Linear`` (the others are ignored by name), the rest target their layers by name (exact
        names win in matching). Static activation scales are the layers' ``input_scale`` tensors."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

        activations = activations or {}
        scheme_of = {name: (spec, activations.get(name)) for name, spec in layers.items()}
        ordered = [key for key, _ in Counter(scheme_of.values()).most_common()]
        groups = {}
        for i, (spec, act) in enumerate(ordered):
            targets = ["Linear"] if i == 0 else sorted(n for n, k in scheme_of.items() if k == (spec, act))
            groups[f"group_{i}"] = QuantizationScheme(
                targets=targets,
                weights=QuantizationArgs(**_weights_args(spec)),
                input_activations=None if act is None else QuantizationArgs(**act.compressed_tensors_args()),
                format=_ct_format(spec),
            )
        formats = {_ct_format(spec) for spec, _ in ordered}
        config = QuantizationConfig(
            config_groups=groups,
            ignore=sorted(unquantized),
            format=formats.pop() if len(formats) == 1 else "mixed-precision",
            quantization_status="compressed",
        )
        return config.model_dump(mode="json")


def _scale_in(scale: torch.Tensor, spec: FormatSpec, dtype: torch.dtype) -> torch.Tensor:
    """Scales in the checkpoint's dtype, as compressed-tensors writes them, where that holds lowbit's
    values exactly (fp16 scales in an fp32 checkpoint); else in lowbit's own scale dtype, so that a
    loader's ``(q - z) * s`` starts from the same numbers (fp16 scales in a bf16 checkpoint)."""
    if dtype.is_floating_point and torch.equal(scale.to(dtype).float(), scale.float()):
        return scale.to(dtype)
    return scale.to(_SCALE_DTYPES[spec.scale_dtype])


def _per_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Parameters as ``[rows, groups]`` (a per-tensor scale is stored once, as ``[1]``)."""
    return t.reshape(1) if t.numel() == 1 and rows != 1 else t.reshape(rows, -1)
