"""Where the blocks, linears and norms are in Hugging Face transformers models."""

from .adapter import ModelAdapter, ResolvedGroup, get_submodule
from .architectures import (
    Architecture,
    LinearGroup,
    ResidualStream,
    UnsupportedArchitectureError,
    architecture_for,
    register_architecture,
    registered_model_types,
)
from .linear import LINEAR_TYPES, in_features, is_linear, out_features, set_weight, weight_of
from .loading import BUILTIN_MODELS, LoadedModel, ModelLoadError, checkpoint_dtype, load_model, resolve_model_path
from .moe import MoESpec, UnfusedExperts

__all__ = [
    "BUILTIN_MODELS",
    "LINEAR_TYPES",
    "Architecture",
    "LinearGroup",
    "LoadedModel",
    "MoESpec",
    "ModelAdapter",
    "ModelLoadError",
    "ResidualStream",
    "ResolvedGroup",
    "UnfusedExperts",
    "UnsupportedArchitectureError",
    "architecture_for",
    "checkpoint_dtype",
    "get_submodule",
    "in_features",
    "is_linear",
    "load_model",
    "out_features",
    "register_architecture",
    "registered_model_types",
    "resolve_model_path",
    "set_weight",
    "weight_of",
]
