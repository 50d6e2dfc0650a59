"""Sequential block-by-block execution of a recipe, in memory or streamed from disk."""

from .capture import capture_first_block_inputs
from .options import PipelineOptions
from .plan import NonFiniteError, Plan, PlanError, check_plan, estimate
from .resume import ResumeMismatch, RunDirectory
from .sanity import SanityCheckFailed, SanityReport, SanityThresholds
from .sequential import PipelineResult, run_pipeline
from .store import InMemoryStore, StreamingStore
from .unit import BlockInputs, LayerResult, QuantState, Unit

__all__ = [
    "BlockInputs",
    "InMemoryStore",
    "LayerResult",
    "NonFiniteError",
    "PipelineOptions",
    "PipelineResult",
    "Plan",
    "PlanError",
    "QuantState",
    "ResumeMismatch",
    "RunDirectory",
    "SanityCheckFailed",
    "SanityReport",
    "SanityThresholds",
    "StreamingStore",
    "Unit",
    "capture_first_block_inputs",
    "check_plan",
    "estimate",
    "run_pipeline",
]
