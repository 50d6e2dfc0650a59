"""The validated description of a number format: element grid x scaling scheme x granularity."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from .ggml_types import GGML_TYPES, ggml_type_of

Kind = Literal["int", "fp", "nf4", "lut", "binary", "ternary"]
Granularity = Literal["tensor", "channel", "group", "token"]
ScaleDType = Literal["float32", "float16", "bfloat16", "e8m0", "e4m3", "uint4", "uint6", "int6", "int8"]
ZeroDType = Literal["float32", "float16", "bfloat16", "int", "uint4", "uint6"]
ZeroStyle = Literal["code", "min"]
ClipMethod = Literal["minmax", "mse", "llama.cpp"]

# (exponent bits, mantissa bits) of the floating-point element types lowbit knows.
FP_ELEMENTS: dict[str, tuple[int, int]] = {
    "e5m2": (5, 2),
    "e4m3": (4, 3),
    "e3m2": (3, 2),
    "e2m3": (2, 3),
    "e2m1": (2, 1),
}

SCALE_BITS: dict[str, int] = {
    "float32": 32,
    "float16": 16,
    "bfloat16": 16,
    "e8m0": 8,
    "e4m3": 8,
    "uint4": 4,
    "uint6": 6,
    "int6": 6,
    "int8": 8,
}

# Scales and mins stored as small integers relative to an fp16 super-scale (llama.cpp's K-quants):
# the range of the stored integer.
INT_CODE_RANGE: dict[str, tuple[int, int]] = {
    "uint4": (0, 15),
    "uint6": (0, 63),
    "int6": (-32, 31),
    "int8": (-128, 127),
}
SUPER_SCALE_BITS = 16  # the super-scale (and super-min) of a super-block: fp16, as in ggml


class FormatError(ValueError):
    """A tensor does not fit a format (shape, values)."""


class FormatSpec(BaseModel):
    """A quantization format.

    Attributes:
        kind: element grid. ``int``: uniform integers; ``fp``: a minifloat (``element``);
            ``nf4``: the NormalFloat-4 grid of QLoRA; ``lut``: any user-given grid ``lut``;
            ``binary``: sign x scale; ``ternary``: {-1, 0, 1} x scale.
        bits: bits per element code (derived for fp/nf4/binary/ternary/lut).
        element: for ``fp``, one of e5m2, e4m3, e3m2, e2m3, e2m1.
        symmetric: for ``int``: no zero-point (codes centred on 0). Asymmetric adds a zero-point
            per group.
        granularity: one scale per ``tensor``, per output ``channel`` (row), per ``group`` of
            ``group_size`` consecutive input elements of a row, or per ``token`` (a row of an
            activation, computed at run time).
        group_size: elements per group when granularity is ``group``.
        scale_dtype: how each scale is stored: a float type, ``e8m0`` (power of two, OCP MX),
            ``e4m3`` (FP8, used by NVFP4 together with ``global_scale``), or a small integer
            (``uint4``, ``uint6``, ``int6``: -32..31, ``int8``) times the fp16 super-scale of the
            group's ``super_block`` (llama.cpp's K-quants).
        global_scale: a second-level FP32 scale per tensor (NVFP4).
        zero_dtype: storage of asymmetric zero-points: a float type, ``int`` (``bits`` bits,
            as GPTQ checkpoints pack them), or (mins only) ``uint4``/``uint6`` times the fp16
            super-min of the group's ``super_block``.
        zero_style: what an asymmetric group stores. ``code``: a zero-point ``z`` in code units,
            ``w = (q - z) * s``. ``min``: an offset ``m`` in weight units, ``w = s * q - m``
            (llama.cpp's Q4_1/Q5_1 and K-quants; decoded in that order, as ggml does).
        super_block: elements per super-block (a multiple of ``group_size``) whose groups share
            one fp16 super-scale (and super-min), with integer ``scale_dtype``/``zero_dtype``.
        clip: ``minmax`` uses the full range; ``mse`` searches a clip ratio per group that
            minimises the ``clip_norm``-norm of the quantization error; ``llama.cpp`` (llama.cpp's
            block formats only) chooses parameters and codes as llama.cpp's reference quantizers
            (``quantize_row_*_ref``) do.
        lut: grid values for ``kind="lut"``; scaled so that max |value| maps to the group's absmax.
        ternary_method: the scale of ternary groups: ``twn`` (Li et al. 2016: the mean
            magnitude of the weights above 0.7 mean|w|) or ``absmean`` (BitNet b1.58: mean|w|).
            Codes are then the nearest of {-1, 0, 1} x scale (the L2-optimal assignment).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind = "int"
    bits: int = 4
    element: str | None = None
    symmetric: bool = True
    granularity: Granularity = "group"
    group_size: int | None = 128
    scale_dtype: ScaleDType = "float16"
    global_scale: bool = False
    zero_dtype: ZeroDType = "float16"
    zero_style: ZeroStyle = "code"
    super_block: int | None = None
    clip: ClipMethod = "minmax"
    clip_grid: int = 20
    clip_min_ratio: float = 0.5
    clip_norm: float = 2.0
    lut: tuple[float, ...] | None = None
    ternary_method: Literal["twn", "absmean"] = "twn"
    name: str | None = None

    @field_validator("clip_min_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"clip_min_ratio must be in (0, 1], got {v}")
        return v

    @field_validator("clip_grid")
    @classmethod
    def _grid(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"clip_grid must be >= 1, got {v}")
        return v

    def _derive_bits(self, bits: int) -> None:
        if "bits" in self.model_fields_set and self.bits != bits:
            raise ValueError(f"bits={self.bits} does not match kind={self.kind!r} ({bits}-bit codes)")
        object.__setattr__(self, "bits", bits)

    @model_validator(mode="after")
    def _check(self) -> FormatSpec:
        kind = self.kind
        if kind == "int":
            if not 1 <= self.bits <= 8:
                raise ValueError(f"bits must be between 1 and 8 for integer formats, got {self.bits}")
            if self.symmetric and self.bits == 1:
                raise ValueError("bits=1 with symmetric=True has no zero level; use kind='binary' or symmetric=False")
        elif kind == "fp":
            if self.element not in FP_ELEMENTS:
                raise ValueError(f"element must be one of {sorted(FP_ELEMENTS)} for kind='fp', got {self.element!r}")
            e, m = FP_ELEMENTS[self.element]
            self._derive_bits(1 + e + m)
        elif kind == "nf4":
            self._derive_bits(4)
        elif kind == "binary":
            self._derive_bits(1)
        elif kind == "ternary":
            self._derive_bits(2)
        elif kind == "lut":
            if not self.lut or len(self.lut) < 2:
                raise ValueError("kind='lut' needs a 'lut' list of at least 2 values")
            if len(set(self.lut)) != len(self.lut):
                raise ValueError("lut values must be distinct")
            if max(abs(v) for v in self.lut) == 0:
                raise ValueError("lut needs a non-zero value")
            self._derive_bits(max(1, (len(self.lut) - 1).bit_length()))
        if kind != "lut" and self.lut is not None:
            raise ValueError(f"lut is only used with kind='lut', not kind={kind!r}")
        if kind != "int" and not self.symmetric:
            raise ValueError(f"symmetric=False (zero-points) is only supported for kind='int', not {kind!r}")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer for granularity='group', got {self.group_size}")
        if self.global_scale and self.granularity != "group":
            raise ValueError("global_scale needs granularity='group'")
        if self.scale_dtype == "e8m0" and kind not in ("fp", "int", "nf4", "lut"):
            raise ValueError(f"scale_dtype='e8m0' is not defined for kind={kind!r}")
        self._check_min_and_super_block()
        if self.clip == "llama.cpp" and self.ggml_type is None:
            names = ", ".join(GGML_TYPES)
            raise ValueError(f"clip='llama.cpp' needs one of llama.cpp's block formats ({names})")
        return self

    def _check_min_and_super_block(self) -> None:
        if self.zero_style == "min" and not self.has_zero_point:
            raise ValueError("zero_style='min' stores a min per group: it needs kind='int' with symmetric=False")
        if self.zero_style == "min" and self.zero_dtype == "int":
            raise ValueError("zero_style='min' stores mins in weight units: zero_dtype cannot be 'int'")
        int_scales = self.scale_dtype in INT_CODE_RANGE
        int_mins = self.has_zero_point and self.zero_dtype in INT_CODE_RANGE
        if self.zero_dtype in INT_CODE_RANGE and self.zero_style != "min":
            raise ValueError(f"zero_dtype={self.zero_dtype!r} codes mins: it needs zero_style='min'")
        if self.super_block is None:
            if int_scales or int_mins:
                what = f"scale_dtype={self.scale_dtype!r}" if int_scales else f"zero_dtype={self.zero_dtype!r}"
                raise ValueError(f"{what} is relative to a super-scale: it needs super_block")
            return
        if self.kind != "int" or self.granularity != "group":
            raise ValueError("super_block needs kind='int' with granularity='group'")
        if self.super_block % self.group_size != 0:
            raise ValueError(f"super_block {self.super_block} must be a multiple of group_size {self.group_size}")
        if not int_scales:
            raise ValueError("super_block needs integer scales (scale_dtype uint4, uint6, int6 or int8)")
        if self.global_scale:
            raise ValueError("super_block and global_scale are two different second-level scales; choose one")

    # ----------------------------------------------------------------- derived facts
    @property
    def has_zero_point(self) -> bool:
        return self.kind == "int" and not self.symmetric

    @property
    def scale_bits(self) -> int:
        return SCALE_BITS[self.scale_dtype]

    @property
    def zero_bits(self) -> int:
        return self.bits if self.zero_dtype == "int" else SCALE_BITS[self.zero_dtype]

    @property
    def super_min(self) -> bool:
        """Mins stored as integers relative to a per-super-block fp16 super-min."""
        return self.has_zero_point and self.zero_dtype in INT_CODE_RANGE

    @property
    def ggml_type(self) -> str | None:
        """The llama.cpp block type with exactly this grid (``q4_k`` ...), if any."""
        t = ggml_type_of(self.model_dump())
        return None if t is None else t.name

    def label(self) -> str:
        """Short human-readable name, e.g. ``int4-asym-g128``."""
        if self.name and self.ggml_type is not None:  # llama.cpp's names say it all
            return self.name if self.clip == "minmax" else f"{self.name}-{self.clip}"
        base = (
            self.name
            or {
                "int": f"int{self.bits}",
                "fp": f"fp{self.bits}_{self.element}",
                "nf4": "nf4",
                "lut": f"lut{self.bits}",
                "binary": "binary",
                "ternary": "ternary",
            }[self.kind]
        )
        parts = [base]
        if self.kind == "int":
            parts.append("sym" if self.symmetric else "asym")
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        else:
            parts.append(f"per-{self.granularity}")
        if self.clip == "mse":
            parts.append("mse")
        return "-".join(parts)
