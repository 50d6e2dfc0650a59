"""Calibration data for methods that look at activations (GPTQ, AWQ, ...)."""

from .data import (
    CalibrationData,
    CalibrationError,
    as_calibration,
    builtin_text_path,
    from_file,
    from_hf_dataset,
    from_text,
)

__all__ = [
    "CalibrationData",
    "CalibrationError",
    "as_calibration",
    "builtin_text_path",
    "from_file",
    "from_hf_dataset",
    "from_text",
]
