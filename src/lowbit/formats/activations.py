"""Activation quantization: how the inputs of a linear layer are quantized when the model runs.

A :class:`ActivationScheme` says the format and where its scales come from:

- ``dynamic: true``: computed from each input as it arrives, one scale per token (a row of the
  input) for INT and FP8, per group of 32/16 elements of a token for MXFP4/NVFP4; as
  compressed-tensors computes them (``absmax / 127.5`` for symmetric INT8, ``absmax / 448`` for FP8);
- ``dynamic: false`` (static): one scale per tensor, calibrated once on the calibration data by an
  ``observer``: ``minmax`` (the largest |x| seen), ``percentile`` (that percentile of |x|, so a few
  outliers do not stretch the grid), or ``mse`` (the clip ratio of the absmax that minimises the
  squared quantization error of the calibration inputs).

:class:`InputQuantizer` applies a scheme: it is attached to a linear (``linear.input_quantizer``)
with a forward pre-hook, so the layer quantizes-dequantizes its input before the matmul. A static
scale lives on the linear as the buffer ``input_scale``: compressed-tensors' name for it, so it is
saved with the layer and read back by loaders of that format.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .presets import make_format
from .qtensor import QParams
from .quantizer import Quantizer, straight_through
from .spec import FormatSpec

#: formats whose scales are per group of a token (their presets fix the group and scale type)
_GROUPED = {"mxfp4", "nvfp4", "mxfp8"}


class ActivationScheme(BaseModel):
    """How a linear layer's inputs are quantized.

    Attributes:
        format: ``int8``, ``int4`` (any integer preset), ``fp8`` (E4M3), ``mxfp4``, ``nvfp4``, ``mxfp8``.
        dynamic: scales computed per token at run time (``True``) or calibrated once per tensor.
        symmetric: integer formats only; ``False`` adds a zero-point (dynamic only).
        observer: how a static scale is calibrated: ``minmax``, ``percentile`` or ``mse``.
        percentile: for ``observer: percentile``, the percentile of |x| that becomes the range.
        max_tokens: calibration tokens the static observers keep per layer (a seeded subset).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = "int8"
    dynamic: bool = True
    symmetric: bool = True
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = Field(99.99, gt=50.0, le=100.0)
    max_tokens: int = Field(65536, ge=16)

    @property
    def _key(self) -> str:
        return self.format.lower().replace("-", "_")

    @model_validator(mode="after")
    def _check(self) -> ActivationScheme:
        key = self._key
        spec = self.spec  # raises for unknown formats
        if spec.kind not in ("int", "fp"):
            raise ValueError(f"format {self.format!r}: activations are quantized to INT or FP formats")
        if key in _GROUPED and not self.dynamic:
            raise ValueError(f"format {self.format!r} has a scale per group of each token: it needs dynamic: true")
        if not self.symmetric and spec.kind != "int":
            raise ValueError("symmetric: false is for integer formats")
        if not self.symmetric and not self.dynamic:
            raise ValueError("static activation scales are symmetric (compressed-tensors stores no zero-point here)")
        return self

    @property
    def spec(self) -> FormatSpec:
        key = self._key
        if key in _GROUPED:
            return make_format(key)
        # scales of activations are computed in float32 at run time and never stored rounded
        granularity = "token" if self.dynamic else "tensor"
        base = make_format(key, symmetric=None if self.symmetric else False).model_dump(exclude_unset=True)
        base.update(granularity=granularity, group_size=None, scale_dtype="float32", clip="minmax")
        return FormatSpec(**base)

    @property
    def bits(self) -> int:
        return self.spec.bits

    def label(self) -> str:
        how = "dynamic" if self.dynamic else f"static-{self.observer}"
        return f"a{self.bits}-{self.format.lower()}-{how}"

    def compressed_tensors_args(self) -> dict[str, Any]:
        """compressed-tensors' ``QuantizationArgs`` for these inputs (as a dict)."""
        spec, key = self.spec, self._key
        args: dict[str, Any] = {
            "num_bits": spec.bits,
            "type": "int" if spec.kind == "int" else "float",
            "symmetric": self.symmetric,
            "strategy": "token" if self.dynamic else "tensor",
            "dynamic": self.dynamic,
        }
        if key in _GROUPED:
            args.update(strategy="group", group_size=spec.group_size)
            if key == "nvfp4":
                args.update(strategy="tensor_group", dynamic="local", scale_dtype="torch.float8_e4m3fn")
            else:
                args["scale_dtype"] = "torch.uint8"
        return args

    @classmethod
    def from_compressed_tensors(cls, args: dict[str, Any]) -> ActivationScheme:
        bits, kind, strategy = args["num_bits"], str(args["type"]), str(args["strategy"])
        if strategy == "tensor_group" and kind == "float" and bits == 4:
            return cls(format="nvfp4", dynamic=True)
        if strategy == "group" and kind == "float" and "uint8" in str(args.get("scale_dtype")):
            return cls(format="mxfp4" if bits == 4 else "mxfp8", dynamic=True)
        if kind == "int" and strategy in ("token", "tensor"):
            return cls(format=f"int{bits}", dynamic=bool(args["dynamic"]), symmetric=bool(args["symmetric"]))
        if kind == "float" and bits == 8 and strategy in ("token", "tensor"):
            return cls(format="fp8", dynamic=bool(args["dynamic"]))
        raise ValueError(f"compressed-tensors input activations {kind} {bits}-bit {strategy} are not read yet")


class InputQuantizer(nn.Module):
    """Quantize-dequantizes a linear's input as ``scheme`` says (straight-through gradient)."""

    def __init__(self, scheme: ActivationScheme):
        super().__init__()
        self.scheme = scheme
        self.quantizer = Quantizer(scheme.spec)

    def forward(self, x: torch.Tensor, static_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.scheme.dynamic:
            return self.quantizer.fake_quant(x.float()).to(x.dtype)
        if static_scale is None:
            raise RuntimeError("a static activation scheme needs the layer's input_scale")
        flat, p = x.detach().float().reshape(1, 1, -1), QParams(static_scale.float().reshape(1, 1, 1))
        return straight_through(x, self.quantizer.quantize_dequantize(flat, p).reshape(x.shape).to(x.dtype))

    def extra_repr(self) -> str:
        return self.scheme.label()


def _quantize_input_hook(module: nn.Module, args: tuple) -> tuple:
    quantizer = getattr(module, "input_quantizer", None)
    if quantizer is None or not args:
        return args
    return (quantizer(args[0], getattr(module, "input_scale", None)), *args[1:])


def attach_input_quantizer(linear: nn.Module, scheme: ActivationScheme, scale: torch.Tensor | None = None) -> None:
    """Make ``linear`` quantize its inputs by ``scheme`` (``scale``: the static per-tensor scale)."""
    if scheme.dynamic == (scale is not None):
        raise ValueError("a static scheme needs its calibrated scale; a dynamic one takes none")
    had = getattr(linear, "input_quantizer", None) is not None
    linear.input_quantizer = InputQuantizer(scheme)
    if scale is not None:
        linear.register_buffer("input_scale", scale.detach().float().reshape(1).clone())
    if not had:
        linear.register_forward_pre_hook(_quantize_input_hook)


def input_scheme(linear: nn.Module) -> ActivationScheme | None:
    quantizer = getattr(linear, "input_quantizer", None)
    return quantizer.scheme if isinstance(quantizer, InputQuantizer) else None


class StaticObserver:
    """Collects |x| of one layer's calibration inputs and turns them into a static scale."""

    def __init__(self, scheme: ActivationScheme, fraction: float = 1.0, seed: int = 0):
        self.scheme = scheme
        self.quantizer = Quantizer(scheme.spec)
        self.fraction = fraction
        self.generator = torch.Generator().manual_seed(seed)
        self.amax = torch.zeros(())
        self.samples: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        self.amax = torch.maximum(self.amax, x.abs().max())
        if self.scheme.observer != "minmax":
            self.samples.append(random_rows(x, self.fraction, self.generator))

    def scale(self) -> torch.Tensor:
        """The per-tensor scale: the chosen range divided by the grid's largest magnitude."""
        top = grid_max(self.quantizer)
        if self.scheme.observer == "minmax" or not self.samples:
            return (self.amax / top).clamp(min=1e-12)
        values = torch.cat(self.samples).abs().flatten()
        if self.scheme.observer == "percentile":
            k = max(1, min(values.numel(), round(values.numel() * self.scheme.percentile / 100)))
            return (values.kthvalue(k).values / top).clamp(min=1e-12)
        flat = torch.cat(self.samples).reshape(1, 1, -1)
        best, best_err = self.amax / top, float("inf")
        for i in range(40):  # clip ratios 1.0 ... 0.2 of the absmax
            scale = (self.amax * (1 - 0.02 * i) / top).clamp(min=1e-12)
            err = float((self.quantizer.quantize_dequantize(flat, QParams(scale.reshape(1, 1, 1))) - flat).pow(2).sum())
            if err < best_err:
                best, best_err = scale, err
        return best


def random_rows(x: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A seeded random ``fraction`` of the rows (tokens) of ``x`` (at least one; all when ``fraction >= 1``),
    how calibration statistics are taken from a subset of the tokens."""
    if fraction >= 1.0:
        return x
    keep = max(1, round(fraction * x.shape[0]))
    return x[torch.randperm(x.shape[0], generator=generator)[:keep].to(x.device)]


def grid_max(quantizer: Quantizer) -> float:
    """What a range's absmax is divided by to give the scale: half the integer code range
    (``(2^b - 1) / 2``, 127.5 for INT8, as lowbit's weights and compressed-tensors' observers use),
    the largest element of a float format (448 for E4M3)."""
    spec = quantizer.spec
    if spec.kind == "int":
        return ((1 << spec.bits) - 1) / 2
    return float(quantizer.table.max_abs)
