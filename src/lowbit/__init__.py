"""lowbit: compress trained neural networks to low bit-widths.

>>> import lowbit
>>> result = lowbit.quantize("reference-lm", lowbit.RTN(format="int4", group_size=128))  # doctest: +SKIP
>>> result.report.table()  # doctest: +SKIP
"""

__version__ = "0.1.0"

import os as _os

# scipy's OpenBLAS (the LAPACK behind packed Hessians) keeps its threads spinning for a while after
# each call, taking the cores from torch's threads: matmuls right after ran 12% slower (2 cores).
# Let them sleep almost at once, unless the user chose otherwise. Read when scipy.linalg loads.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .algorithms import RTN, Step, build_step, register_step
from .api import QuantizationResult, quantize
from .formats import FormatSpec, Quantizer, make_format
from .models import load_model
from .pipeline import PipelineOptions
from .recipe import Recipe

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
