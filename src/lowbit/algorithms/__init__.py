"""Post-training quantization methods, one module each; importing registers their steps."""

from . import awq, gptq, hqq, rtn  # noqa: F401  (importing registers the steps)
from .base import STEPS, Step, StepConfig, StepConfigError, WeightQuantConfig, build_step, register_step
from .awq import AWQ, AWQConfig
from .gptq import GPTQ, GPTQConfig, gptq_quantize
from .hqq import HQQ, HQQConfig, hqq_quantize
from .rtn import RTN, RTNConfig

__all__ = [
    "AWQ",
    "AWQConfig",
    "HQQ",
    "HQQConfig",
    "hqq_quantize",
    "GPTQ",
    "GPTQConfig",
    "gptq_quantize",
    "RTN",
    "STEPS",
    "RTNConfig",
    "Step",
    "StepConfig",
    "StepConfigError",
    "WeightQuantConfig",
    "build_step",
    "register_step",
]
