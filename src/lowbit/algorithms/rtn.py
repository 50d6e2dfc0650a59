"""Round-to-nearest (RTN): every weight to its nearest grid point, no data needed."""

from __future__ import annotations

import time

from ..formats import Quantizer
from ..models import weight_of
from .base import Step, WeightQuantConfig, register_step


class RTNConfig(WeightQuantConfig):
    """RTN has only the common weight-quantization options (format, bits, group size, clip)."""


@register_step
class RTN(Step):
    """Round each weight to the nearest point of the format's grid (with min-max or MSE clipping)."""

    name = "rtn"
    Config = RTNConfig
    quantizes_weights = True

    def apply(self, unit) -> None:
        quantizer = Quantizer(self.config.spec)
        for name, module in unit.select(self.config).items():
            start = time.perf_counter()
            qtensor = quantizer.quantize(weight_of(module).detach().float())
            unit.commit(name, module, qtensor, self.name, seconds=time.perf_counter() - start)
