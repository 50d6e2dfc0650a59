"""Number formats: integer, minifloat, microscaling, NF4/lookup tables, binary and ternary.

Knows nothing of models: a format turns tensors into codes plus scales and back, and counts
exactly how many bits that takes.
"""

from .grids import fp_code_values, fp_max, nf4_values
from .packing import pack, packed_length, unpack
from .presets import PRESETS, format_names, make_format
from .quantizer import FormatError, QParams, QuantizedTensor, Quantizer, check_finite
from .spec import FormatSpec

__all__ = [
    "PRESETS",
    "FormatError",
    "FormatSpec",
    "QParams",
    "QuantizedTensor",
    "Quantizer",
    "check_finite",
    "format_names",
    "fp_code_values",
    "fp_max",
    "make_format",
    "nf4_values",
    "pack",
    "packed_length",
    "unpack",
]
