"""Vector-quantization layers for discrete tokenizers and codecs.

Every layer returns :class:`VQOutput` ``(quantized, indices, loss, aux)`` and decodes with ``indices_to_codes``.
"""

from .base import Quantizer, VQOutput, rotation_trick, straight_through
from .fsq import FSQ, FSQConfig
from .kmeans import kmeans
from .lfq import BSQ, LFQ, LFQConfig
from .metrics import (
    UsageMeter,
    bits_per_token,
    code_entropy_bits,
    code_histogram,
    codebook_utilization,
    perplexity,
)
from .product import ProductQuantize, ProductQuantizeConfig
from .residual import GroupedResidualVQ, GroupedResidualVQConfig, ResidualVQ, ResidualVQConfig
from .vector_quantize import VectorQuantize, VQConfig

BSQConfig = LFQConfig

__all__ = [
    "BSQ",
    "FSQ",
    "LFQ",
    "BSQConfig",
    "FSQConfig",
    "GroupedResidualVQ",
    "GroupedResidualVQConfig",
    "LFQConfig",
    "ProductQuantize",
    "ProductQuantizeConfig",
    "Quantizer",
    "ResidualVQ",
    "ResidualVQConfig",
    "UsageMeter",
    "VQConfig",
    "VQOutput",
    "VectorQuantize",
    "bits_per_token",
    "code_entropy_bits",
    "code_histogram",
    "codebook_utilization",
    "kmeans",
    "perplexity",
    "rotation_trick",
    "straight_through",
]
