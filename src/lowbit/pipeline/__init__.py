"""Sequential block-by-block execution of a recipe."""

from .sequential import NonFiniteError, PipelineOptions, PlanError, capture_first_block_inputs, run_pipeline
from .unit import BlockInputs, LayerResult, QuantState, Unit

__all__ = [
    "BlockInputs",
    "LayerResult",
    "NonFiniteError",
    "PipelineOptions",
    "PlanError",
    "QuantState",
    "Unit",
    "capture_first_block_inputs",
    "run_pipeline",
]
