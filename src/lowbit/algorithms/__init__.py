"""Post-training quantization methods, one module each; importing registers their steps."""

from . import awq, gptq, hqq, outlier_suppression, quarot, rtn, smoothquant, spinquant  # noqa: F401  (importing registers the steps)
from .awq import AWQ, AWQConfig
from .base import STEPS, Step, StepConfig, StepConfigError, WeightQuantConfig, build_step, register_step
from .gptq import GPTQ, GPTQConfig, gptq_quantize
from .hqq import HQQ, HQQConfig, hqq_quantize
from .outlier_suppression import OutlierSuppression, OutlierSuppressionConfig
from .quarot import QuaRot, QuaRotConfig
from .rtn import RTN, RTNConfig
from .smoothquant import SmoothQuant, SmoothQuantConfig
from .spinquant import SpinQuant, SpinQuantConfig

__all__ = [
    "AWQ",
    "GPTQ",
    "HQQ",
    "RTN",
    "STEPS",
    "AWQConfig",
    "GPTQConfig",
    "HQQConfig",
    "OutlierSuppression",
    "OutlierSuppressionConfig",
    "QuaRot",
    "QuaRotConfig",
    "RTNConfig",
    "SmoothQuant",
    "SmoothQuantConfig",
    "SpinQuant",
    "SpinQuantConfig",
    "Step",
    "StepConfig",
    "StepConfigError",
    "WeightQuantConfig",
    "build_step",
    "gptq_quantize",
    "hqq_quantize",
    "register_step",
]
