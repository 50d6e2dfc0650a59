"""Post-training quantization methods, one module each; importing registers their steps."""

from . import rtn  # noqa: F401  (registers the step)
from .base import STEPS, Step, StepConfig, StepConfigError, WeightQuantConfig, build_step, register_step
from .rtn import RTN, RTNConfig

__all__ = [
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
