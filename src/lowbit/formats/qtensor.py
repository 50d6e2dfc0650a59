"""Quantization parameters (:class:`QParams`) and quantized tensors (:class:`QuantizedTensor`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

import torch

from .spec import FormatSpec

if TYPE_CHECKING:
    from collections.abc import Iterator

# Parameters held once per group (the rest, the global scale, once per tensor).
_PER_GROUP = ("scale", "zero", "super_scale", "super_min")


@dataclass
class QParams:
    """Per-group quantization parameters, shaped ``[rows, groups, 1]`` (float32).

    ``scale`` holds the *stored* scale values (already rounded to ``scale_dtype``): a float, or for
    formats with super-blocks the small integer that multiplies the group's ``super_scale`` (the
    fp16 scale of its super-block, repeated for each of its groups). The scale applied to codes is
    :meth:`effective_scale`. ``zero`` is a zero-point in code units, or with ``zero_style="min"`` the
    stored min (an integer times ``super_min`` when mins are integers).
    """

    scale: torch.Tensor
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    super_scale: torch.Tensor | None = None
    super_min: torch.Tensor | None = None

    def effective_scale(self) -> torch.Tensor:
        s = self.scale if self.global_scale is None else self.scale * self.global_scale
        # integer x fp16 is exact in float32: the same value as ggml's d * sc, in any order
        return s if self.super_scale is None else s * self.super_scale

    def effective_zero(self) -> torch.Tensor | None:
        if self.zero is None or self.super_min is None:
            return self.zero
        return self.zero * self.super_min

    def grouped(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The per-group fields that are present, by name."""
        for name in _PER_GROUP:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def select(self, index: torch.Tensor | slice | int) -> QParams:
        """Parameters of a subset of groups (along dim 1)."""
        return replace(self, **{name: value[:, index] for name, value in self.grouped()})

    def where(self, mask: torch.Tensor, other: QParams) -> QParams:
        """``other``'s parameters where ``mask`` (per group) is true, these elsewhere."""
        return replace(self, **{name: torch.where(mask, getattr(other, name), v) for name, v in self.grouped()})


@dataclass
class QuantizedTensor:
    """Integer codes plus the parameters needed to reconstruct a 2-D tensor.

    ``codes`` has the tensor's (2-D) shape; ``scale``/``zero`` are ``[rows, groups]``. ``g_idx``
    maps each column to its group when columns were not grouped contiguously (GPTQ act-order).
    ``super_scale``/``super_min`` are ``[rows, super_blocks]``: the fp16 second-level scales of
    formats with super-blocks (llama.cpp's K-quants), whose groups ``k*j ... k*j+k-1`` belong to
    super-block ``j``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    global_scale: torch.Tensor | None
    spec: FormatSpec
    shape: tuple[int, ...]
    g_idx: torch.Tensor | None = field(default=None)
    super_scale: torch.Tensor | None = field(default=None)
    super_min: torch.Tensor | None = field(default=None)

    @classmethod
    def from_params(
        cls,
        codes: torch.Tensor,
        p: QParams,
        spec: FormatSpec,
        shape: tuple[int, ...],
        g_idx: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """Codes plus ``[rows, groups, 1]`` parameters; the super-block fields are kept once per
        super-block (every group of a super-block carries the same values)."""
        per_super = None if spec.super_block is None else spec.super_block // spec.group_size

        def once(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, ::per_super, 0]

        return cls(
            codes=codes,
            scale=p.scale[..., 0],
            zero=None if p.zero is None else p.zero[..., 0],
            global_scale=p.global_scale,
            spec=spec,
            shape=shape,
            g_idx=g_idx,
            super_scale=once(p.super_scale),
            super_min=once(p.super_min),
        )

    def params(self) -> QParams:
        def per_group(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.repeat_interleave(self.scale.shape[-1] // t.shape[-1], dim=-1).unsqueeze(-1)

        return QParams(
            self.scale.unsqueeze(-1),
            None if self.zero is None else self.zero.unsqueeze(-1),
            self.global_scale,
            per_group(self.super_scale),
            per_group(self.super_min),
        )

    def bits_per_weight(self) -> float:
        from .quantizer import Quantizer

        return Quantizer(self.spec).bits_per_weight(self.shape)

    def rows(self, start: int, stop: int) -> QuantizedTensor:
        """Rows ``start:stop`` of a 2-D quantized tensor (views; per-tensor parameters are shared)."""
        if len(self.shape) != 2:
            raise ValueError(f"rows() needs a 2-D quantized tensor, not shape {self.shape}")
        per_row = self.spec.granularity != "tensor"

        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else (t[start:stop] if per_row else t)

        return replace(
            self,
            codes=self.codes[start:stop],
            scale=part(self.scale),
            zero=part(self.zero),
            super_scale=part(self.super_scale),
            super_min=part(self.super_min),
            shape=(len(range(*slice(start, stop).indices(self.shape[0]))), self.shape[1]),
        )

    def to(self, device: torch.device | str) -> QuantizedTensor:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)
