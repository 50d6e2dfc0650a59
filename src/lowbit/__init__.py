"""lowbit: compress trained neural networks to low bit-widths.

>>> import lowbit
>>> result = lowbit.quantize("reference-lm", lowbit.RTN(format="int4", group_size=128))  # doctest: +SKIP
>>> result.report.table()  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .algorithms import RTN, Step, build_step, register_step  # noqa: E402
from .api import QuantizationResult, quantize  # noqa: E402
from .formats import FormatSpec, Quantizer, make_format  # noqa: E402
from .models import load_model  # noqa: E402
from .pipeline import PipelineOptions  # noqa: E402
from .recipe import Recipe  # noqa: E402

__all__ = [
    "RTN",
    "FormatSpec",
    "PipelineOptions",
    "QuantizationResult",
    "Quantizer",
    "Recipe",
    "Step",
    "__version__",
    "build_step",
    "load_model",
    "make_format",
    "quantize",
    "register_step",
]
