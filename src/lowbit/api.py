"""The public entry point: ``lowbit.quantize(model, recipe, calibration=...)``."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .calibration import CalibrationData, as_calibration
from .export import save_model_dir
from .formats import QuantizedTensor
from .models import LoadedModel, checkpoint_dtype, load_model
from .models.loading import model_kind
from .pipeline import PipelineOptions, run_pipeline
from .recipe import Recipe, as_recipe
from .report import QuantizationReport, build_report

log = logging.getLogger(__name__)


@dataclass
class QuantizationResult:
    """The quantized model (weights replaced by their dequantized values), codes, and the report."""

    model: nn.Module
    report: QuantizationReport
    recipe: Recipe
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    tokenizer: Any = None
    source: str | None = None
    storage_dtype: torch.dtype | None = None

    def save(self, out_dir: str | Path, *, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
        """Save a loadable model directory (safetensors + config + tokenizer + the recipe used).

        ``dtype`` defaults to the dtype of the checkpoint the model came from.
        """
        meta = {
            "lowbit_version": __version__,
            "source_model": self.source,
            **self.report.to_dict(),
        }
        return save_model_dir(
            self.model,
            out_dir,
            tokenizer=self.tokenizer,
            dtype=dtype or self.storage_dtype,
            extra_files={
                "lowbit_recipe.yaml": self.recipe.to_yaml(),
                "lowbit_report.json": json.dumps(meta, indent=2) + "\n",
            },
            overwrite=overwrite,
        )


def quantize(
    model: nn.Module | str | Path | LoadedModel,
    recipe: Any,
    calibration: Any = None,
    *,
    tokenizer: Any = None,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    options: PipelineOptions | None = None,
    **option_overrides: Any,
) -> QuantizationResult:
    """Quantize ``model`` in place with ``recipe`` and return the model and a report.

    Args:
        model: an ``nn.Module`` (a Hugging Face model), a built-in model name
            (``reference-lm``, ``minilm``), a model directory or a hub id.
        recipe: a :class:`~lowbit.recipe.Recipe`, a step (``lowbit.algorithms.RTN(format="int4")``),
            a list of steps or ``{name: config}`` mappings, or YAML (a path or text).
        calibration: data for calibrated steps: :class:`~lowbit.calibration.CalibrationData`,
            a ``[N, T]`` token tensor, ``"builtin"``, a text file path, ``"hf:DATASET[:SPLIT]"``
            or a list of strings (tokenised with ``tokenizer`` or the model's own).
        n_samples, seq_len, seed: how text calibration data is sampled.
        options: a :class:`~lowbit.pipeline.PipelineOptions`; keyword overrides of its fields
            (``device=``, ``batch_size=``, ``progress=`` ...) are accepted too.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    source = None
    storage_dtype = None
    if isinstance(model, (str, Path)):
        model = load_model(model)
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer or model.tokenizer
        source = str(model.name)
        storage_dtype = checkpoint_dtype(model.path) if isinstance(model.path, Path) else None
        model = model.model
    recipe = as_recipe(recipe)
    options = options or PipelineOptions(progress=False)
    if option_overrides:
        options = PipelineOptions(**{**options.__dict__, **option_overrides})
    calib: CalibrationData | None = None
    if recipe.needs_calibration or calibration is not None:
        mode = "windows" if model_kind(model.config) == "causal-lm" else "lines"
        calib = as_calibration(calibration, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed, mode=mode)
    was_training = model.training
    model.eval()
    state = run_pipeline(model, recipe.steps, calib, options)
    model.train(was_training)
    extra = {"calibration": calib.source if calib is not None else None}
    report = build_report(model, state, time.perf_counter() - start, storage_dtype=storage_dtype, extra=extra)
    return QuantizationResult(
        model=model,
        report=report,
        recipe=recipe,
        quantized=state.quantized,
        tokenizer=tokenizer,
        source=source,
        storage_dtype=storage_dtype,
    )
