"""Which layers of a checkpoint are stored quantized, in which format and layout.

Read from ``config.json``'s ``quantization_config``: lowbit's own packed layout names each layer's
format; a compressed-tensors checkpoint (lowbit's or one that llm-compressor wrote) has config
groups, matched to the model's modules with compressed-tensors' own rules (exact names, then
regular expressions, then class names; ``ignore`` wins).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..export.compressed_tensors import CompressedTensorsLayout
from ..export.gptq_awq import awq_specs, gptq_specs
from ..export.layouts import Layout
from ..export.lowbit_packed import LowbitPackedLayout, activation_schemes_of, specs_of
from ..formats import FormatSpec, make_format
from ..formats.activations import ActivationScheme
from ..models.loading import ModelLoadError

_SCALE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def quantized_layers(
    config: Mapping[str, Any] | None, model: nn.Module, stored_dtype
) -> tuple[Layout, dict[str, FormatSpec], dict[str, ActivationScheme]] | None:
    """The layout, the format of every quantized linear and how those that quantize their inputs do
    it (``None``: a plain checkpoint). ``stored_dtype(layer, leaf)`` gives the dtype of a layer's
    stored tensor (``None`` if absent)."""
    if not config:
        return None
    method = config.get("quant_method")
    if method == "lowbit":
        return LowbitPackedLayout(), specs_of(config), activation_schemes_of(config)
    if method == "compressed-tensors":
        return CompressedTensorsLayout(), *_compressed_tensors_schemes(config, model, stored_dtype)
    if method in ("gptq", "awq"):
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and stored_dtype(n, "qweight")]
        return *(gptq_specs if method == "gptq" else awq_specs)(config, names), {}
    raise ModelLoadError(
        f"lowbit cannot read checkpoints quantized with {method!r} "
        "(it reads compressed-tensors, GPTQ, AutoAWQ GEMM and its own layout)"
    )


def _compressed_tensors_schemes(
    config: Mapping[str, Any], model: nn.Module, stored_dtype
) -> tuple[dict[str, FormatSpec], dict[str, ActivationScheme]]:
    """Weight formats and input schemes of the linears the config groups match (one matching pass)."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules, match_targets

    parsed = QuantizationConfig.model_validate(dict(config))
    if parsed.quantization_status != "compressed":
        raise ModelLoadError(
            f"compressed-tensors checkpoint with quantization_status {parsed.quantization_status!r}: lowbit reads "
            "compressed (packed) checkpoints"
        )
    by_target = {}
    for scheme in parsed.config_groups.values():
        for target in scheme.targets:
            by_target[target] = scheme
    specs, activations = {}, {}
    for name, module in match_named_modules(model, by_target, parsed.ignore):
        if not isinstance(module, nn.Linear):
            continue
        scheme = by_target[match_targets(name, module, by_target)[0]]
        specs[name] = _spec_of(name, scheme.weights.model_dump(), stored_dtype(name, "weight_scale") or torch.float32)
        if scheme.input_activations is not None:
            try:
                activations[name] = ActivationScheme.from_compressed_tensors(scheme.input_activations.model_dump())
            except ValueError as exc:
                raise ModelLoadError(f"{name}: {exc}") from None
    return specs, activations


def _spec_of(name: str, args: Mapping[str, Any], scale_dtype: torch.dtype) -> FormatSpec:
    """lowbit's format for compressed-tensors' ``QuantizationArgs`` (as a dict)."""
    strategy, bits, kind = str(args["strategy"]), args["num_bits"], str(args["type"])
    group_size = {"group": args.get("group_size"), "channel": -1, "tensor": 0, "tensor_group": 16}.get(strategy)
    if group_size is None:
        raise ModelLoadError(f"{name}: compressed-tensors strategy {strategy!r} is not read yet")
    scale = _SCALE_DTYPES.get(scale_dtype)
    if kind == "int":
        return make_format(
            "int", bits=bits, group_size=group_size, symmetric=args["symmetric"], scale_dtype=scale, zero_dtype="int"
        )
    if kind == "float" and bits == 8 and strategy in ("channel", "tensor"):
        return make_format("fp8", group_size=group_size, scale_dtype=scale)
    if kind == "float" and bits == 8 and "uint8" in str(args.get("scale_dtype")):
        return make_format("mxfp8")
    if kind == "float" and bits == 4 and strategy == "tensor_group":
        return make_format("nvfp4")
    if kind == "float" and bits == 4 and "uint8" in str(args.get("scale_dtype")):
        return make_format("mxfp4")
    raise ModelLoadError(f"{name}: compressed-tensors {kind} {bits}-bit {strategy} weights are not read yet")
