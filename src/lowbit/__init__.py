"""lowbit: compress trained neural networks to low bit-widths.

>>> import lowbit
>>> result = lowbit.quantize("reference-lm", lowbit.RTN(format="int4", group_size=128))  # doctest: +SKIP
>>> result.report.table()  # doctest: +SKIP

The names below are imported on first use, so that ``import lowbit`` (and ``lowbit --help``)
does not pay for torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "RTN": "algorithms",
    "Step": "algorithms",
    "build_step": "algorithms",
    "register_step": "algorithms",
    "QuantizationResult": "api",
    "quantize": "api",
    "FormatSpec": "formats",
    "Quantizer": "formats",
    "make_format": "formats",
    "load_model": "models",
    "load": "runtime",
    "PipelineOptions": "pipeline",
    "Recipe": "recipe",
}

__all__ = [  # noqa: RUF022 - the version first, then the lazily imported names of _EXPORTS
    "__version__",
    "FormatSpec",
    "PipelineOptions",
    "QuantizationResult",
    "Quantizer",
    "RTN",
    "Recipe",
    "Step",
    "build_step",
    "load",
    "load_model",
    "make_format",
    "quantize",
    "register_step",
]

if TYPE_CHECKING:
    from .algorithms import RTN, Step, build_step, register_step
    from .api import QuantizationResult, quantize
    from .formats import FormatSpec, Quantizer, make_format
    from .models import load_model
    from .pipeline import PipelineOptions
    from .recipe import Recipe
    from .runtime import load


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
