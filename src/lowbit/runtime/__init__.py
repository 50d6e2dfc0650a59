"""Running quantized models: loading packed checkpoints, linear layers that stay quantized."""

from .load import load
from .packed_linear import PackedLinear

__all__ = ["PackedLinear", "load"]
