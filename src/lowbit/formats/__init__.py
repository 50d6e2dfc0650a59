"""Number formats: integer, minifloat, microscaling, NF4/lookup tables, binary and ternary, and
llama.cpp's block formats (Q4_0 ... Q6_K) with their ggml byte layouts.

Knows nothing of models: a format turns tensors into codes plus scales and back, and counts
exactly how many bits that takes.
"""

from .ggml import GGML_TYPES, from_ggml_bytes, ggml_quant_type, ggml_type, to_ggml_bytes
from .grids import fp_code_values, fp_max, nf4_values
from .packing import pack, packed_length, unpack
from .presets import PRESETS, format_names, make_format
from .quantizer import FormatError, QParams, QuantizedTensor, Quantizer, check_finite
from .spec import FormatSpec

__all__ = [
    "GGML_TYPES",
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
    "from_ggml_bytes",
    "ggml_quant_type",
    "ggml_type",
    "make_format",
    "nf4_values",
    "pack",
    "packed_length",
    "to_ggml_bytes",
    "unpack",
]
