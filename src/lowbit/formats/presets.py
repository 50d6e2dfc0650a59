"""Named formats (``int4``, ``nf4``, ``mxfp4``, ``nvfp4`` ...) and overrides on top of them."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .ggml_types import GGML_TYPES, STRUCTURE_FIELDS
from .spec import FormatSpec

# Presets fix the element grid and, for the block formats, the block structure that defines them.
PRESETS: dict[str, dict[str, Any]] = {
    **{f"int{b}": {"kind": "int", "bits": b} for b in range(2, 9)},
    "int": {"kind": "int"},
    "fp8": {"kind": "fp", "element": "e4m3", "granularity": "channel", "group_size": None, "scale_dtype": "float32"},
    "fp8_e4m3": {
        "kind": "fp",
        "element": "e4m3",
        "granularity": "channel",
        "group_size": None,
        "scale_dtype": "float32",
    },
    "fp8_e5m2": {
        "kind": "fp",
        "element": "e5m2",
        "granularity": "channel",
        "group_size": None,
        "scale_dtype": "float32",
    },
    "fp6": {"kind": "fp", "element": "e3m2"},
    "fp6_e3m2": {"kind": "fp", "element": "e3m2"},
    "fp6_e2m3": {"kind": "fp", "element": "e2m3"},
    "fp4": {"kind": "fp", "element": "e2m1"},
    "fp4_e2m1": {"kind": "fp", "element": "e2m1"},
    "mxfp4": {
        "kind": "fp",
        "element": "e2m1",
        "granularity": "group",
        "group_size": 32,
        "scale_dtype": "e8m0",
        "name": "mxfp4",
    },
    "mxfp6": {
        "kind": "fp",
        "element": "e3m2",
        "granularity": "group",
        "group_size": 32,
        "scale_dtype": "e8m0",
        "name": "mxfp6",
    },
    "mxfp8": {
        "kind": "fp",
        "element": "e4m3",
        "granularity": "group",
        "group_size": 32,
        "scale_dtype": "e8m0",
        "name": "mxfp8",
    },
    "nvfp4": {
        "kind": "fp",
        "element": "e2m1",
        "granularity": "group",
        "group_size": 16,
        "scale_dtype": "e4m3",
        "global_scale": True,
        "name": "nvfp4",
    },
    "nf4": {"kind": "nf4", "group_size": 64},
    "binary": {"kind": "binary", "granularity": "channel", "group_size": None},
    "ternary": {"kind": "ternary", "granularity": "channel", "group_size": None},
    # llama.cpp's block formats (q4_0 ... q6_k): their grids, exactly
    **{name: {**t.fields, "name": name} for name, t in GGML_TYPES.items()},
}

# Fields a preset fixes because the format is defined by them (the OCP MX, NVFP4 and ggml block layouts).
_FIXED = {
    **{name: ("group_size", "scale_dtype") for name in ("mxfp4", "mxfp6", "mxfp8", "nvfp4")},
    **{name: tuple(f for f in STRUCTURE_FIELDS if f != "granularity") for name in GGML_TYPES},
}


def format_names() -> list[str]:
    return sorted(PRESETS)


def make_format(fmt: str | FormatSpec | dict[str, Any] = "int4", **overrides: Any) -> FormatSpec:
    """Build a :class:`FormatSpec` from a preset name, a dict or a spec, plus field overrides.

    ``group_size``: a positive value selects groups, ``-1`` per-channel scales, ``0`` one scale
    per tensor. Overrides that are ``None`` keep the preset's value.

    >>> make_format("int4", group_size=128, symmetric=False).label()
    'int4-asym-g128'
    """
    if isinstance(fmt, FormatSpec):
        base: dict[str, Any] = fmt.model_dump(exclude_unset=True)
    elif isinstance(fmt, dict):
        base = dict(fmt)
    else:
        key = fmt.lower().replace("-", "_")
        if key not in PRESETS:
            raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(format_names())}")
        base = dict(PRESETS[key])
        for field in _FIXED.get(key, ()):
            fixed = base.get(field, FormatSpec.model_fields[field].default)
            if field in overrides and overrides[field] is not None and overrides[field] != fixed:
                raise ValueError(f"{key} is defined with {field}={fixed!r}; got {field}={overrides[field]!r}")
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "group_size":
            if value == -1:
                base.update(granularity="channel", group_size=None)
            elif value == 0:
                base.update(granularity="tensor", group_size=None)
            else:
                base.update(granularity="group", group_size=value)
        else:
            base[key] = value
    try:
        return FormatSpec.model_validate(base)
    except ValidationError as exc:
        raise ValueError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid format: " + "; ".join(parts)
