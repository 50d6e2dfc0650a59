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
from .calibration import CalibrationData, CalibrationError, as_calibration
from .export import save_model_dir
from .formats import QuantizedTensor
from .models import LoadedModel, ModelLoadError, checkpoint_dtype, load_model, resolve_model_path
from .models.loading import model_kind
from .pipeline import PipelineOptions, SanityCheckFailed, SanityReport, run_pipeline
from .pipeline.directory import DirectoryRun, quantize_directory
from .pipeline.timing import LOAD, PhaseTimes
from .recipe import Recipe, as_recipe
from .report import QuantizationReport, build_report, weight_files_bytes

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
    sanity: SanityReport | None = None

    def save(
        self,
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        dtype: torch.dtype | None = None,
        force: bool = False,
        save_format: str = "auto",
    ) -> Path:
        """Save a loadable model directory (safetensors + config + tokenizer + the recipe used).

        ``save_format``: ``auto`` (compressed-tensors where it holds every layer, else lowbit's
        packed layout), ``compressed-tensors``, ``lowbit`` or ``fake`` (dense dequantized weights).
        Packed formats need the codes (``keep_codes``, on by default). ``dtype`` defaults to the
        dtype of the checkpoint the model came from. A model that failed the sanity check is not
        saved unless ``force``.
        """
        if self.sanity is not None and not self.sanity.passed and not force:
            raise SanityCheckFailed(self.sanity)
        from .export.checkpoint import save_packed_model_dir
        from .export.layouts import ExportError, choose_layout
        from .formats.activations import input_scheme
        from .models import ModelAdapter

        if save_format != "fake" and not self.quantized and self.report.layers:
            raise ExportError(
                "this result kept no codes (keep_codes=False): save it with save_format='fake', or quantize with "
                "keep_codes=True for a packed checkpoint"
            )
        modules = dict(self.model.named_modules())
        activations = {n: a for n, m in modules.items() if (a := input_scheme(m)) is not None}
        layout = choose_layout(
            save_format,
            {n: (q.spec, modules.get(n), None, q) for n, q in self.quantized.items()},
            list(activations.values()),
        )

        def report_json(directory: Path) -> str:  # written last, when the weights' size on disk is known
            self.report.size_on_disk_bytes = weight_files_bytes(directory)
            meta = {"lowbit_version": __version__, "source_model": self.source, **self.report.to_dict()}
            return json.dumps(meta, indent=2) + "\n"

        extra = {"lowbit_recipe.yaml": self.recipe.to_yaml(), "lowbit_report.json": report_json}
        dtype = dtype or self.storage_dtype
        if not layout.packs:
            return save_model_dir(
                self.model, out_dir, tokenizer=self.tokenizer, dtype=dtype, extra_files=extra, overwrite=overwrite
            )
        linears = ModelAdapter.linears_in(self.model)
        unquantized = [n for n in linears if n not in self.quantized]
        return save_packed_model_dir(
            self.model,
            out_dir,
            self.quantized,
            layout,
            unquantized,
            tokenizer=self.tokenizer,
            dtype=dtype,
            extra_files=extra,
            overwrite=overwrite,
            activations=activations,
        )


def quantize(
    model: nn.Module | str | Path | LoadedModel,
    recipe: Any,
    calibration: Any = None,
    *,
    tokenizer: Any = None,
    n_samples: int = 128,
    seq_len: int | None = None,
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
        n_samples, seq_len, seed: how text calibration data is sampled (``seq_len`` defaults to
            512 tokens, or the model's context if shorter).
        options: a :class:`~lowbit.pipeline.PipelineOptions`; keyword overrides of its fields
            (``device=``, ``batch_size=``, ``progress=`` ...) are accepted too. A progress bar
            is shown unless ``progress=False``.

    Results depend only on the arguments (``seed`` seeds lowbit's own generators; torch's global
    random state is neither used nor changed).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    timings = PhaseTimes()
    source = None
    storage_dtype = None
    if isinstance(model, (str, Path)):
        with timings.phase(LOAD):
            model = load_model(model)
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer or model.tokenizer
        source = str(model.name)
        storage_dtype = checkpoint_dtype(model.path) if isinstance(model.path, Path) else None
        model = model.model
    recipe = as_recipe(recipe)
    options = options or PipelineOptions(keep_codes=True)  # the codes a packed save needs
    if option_overrides:
        options = PipelineOptions(**{**options.__dict__, **option_overrides})
    calib, held_back = prepare_calibration(model, recipe, calibration, tokenizer, n_samples, seq_len, seed, options)
    was_training = model.training
    model.eval()
    result = run_pipeline(model, recipe.steps, calib, options, held_back=held_back, timings=timings)
    model.train(was_training)
    extra = {"calibration": calib.describe() if calib is not None else None}
    if result.sanity is not None:
        result.sanity.decode(tokenizer)
        extra["sanity"] = result.sanity.to_dict()
        if not result.sanity.passed:
            log.warning("%s", SanityCheckFailed(result.sanity))
    report = build_report(
        model,
        result.state,
        time.perf_counter() - start,
        storage_dtype=storage_dtype,
        extra=extra,
        cpu_seconds=time.process_time() - cpu_start,
        timings=timings.to_dict(),
    )
    return QuantizationResult(
        model=model,
        report=report,
        recipe=recipe,
        quantized=result.state.quantized,
        tokenizer=tokenizer,
        source=source,
        storage_dtype=storage_dtype,
        sanity=result.sanity,
    )


def prepare_calibration(model_or_config, recipe: Recipe, calibration, tokenizer, n_samples, seq_len, seed, options):
    """Calibration samples plus the held-back samples of the sanity check (drawn together, split)."""
    if calibration is None:
        if recipe.needs_calibration:
            needs = ", ".join(s.name for s in recipe.steps if s.needs_calibration)
            raise CalibrationError(f"step(s) {needs} need calibration data; pass calibration=...")
        return None, None
    config = getattr(model_or_config, "config", model_or_config)
    causal = model_kind(config) == "causal-lm"
    # Samples are held back only from data lowbit samples itself; given tensors are used whole.
    sampled = not isinstance(calibration, (CalibrationData, torch.Tensor))
    extra = options.sanity_samples if causal and sampled and options.sanity_samples > 0 else 0
    if not recipe.needs_calibration and ((tokenizer is None and sampled) or not extra):
        if extra:
            log.warning("the model has no tokenizer, so the sanity check cannot sample text; skipping it")
        return None, None
    mode = "windows" if causal else "lines"
    limit = getattr(config, "max_position_embeddings", None) or 512
    if seq_len is None:
        seq_len = min(512, limit)
    elif seq_len > limit:
        log.warning("seq_len %d is longer than the model's context (%d positions)", seq_len, limit)
    calib = as_calibration(calibration, tokenizer, n_samples=n_samples + extra, seq_len=seq_len, seed=seed, mode=mode)
    if extra and calib.n_samples > extra:
        calib, held_back = calib.split(extra)
        if not recipe.needs_calibration:
            return None, held_back
        return calib, held_back
    return (calib if recipe.needs_calibration else None), None


def quantize_checkpoint(
    model_dir: str | Path,
    recipe: Any,
    out_dir: str | Path,
    calibration: Any = "builtin",
    *,
    n_samples: int = 128,
    seq_len: int | None = None,
    seed: int = 0,
    options: PipelineOptions | None = None,
    save_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    restart: bool = False,
    force: bool = False,
    dry_run: bool = False,
    save_format: str = "auto",
) -> DirectoryRun:
    """Quantize a model directory (or built-in name) into ``out_dir`` without loading it whole.

    Blocks are read from disk one at a time and written out as they finish; an interrupted run
    started again with the same arguments resumes from the last finished block (``restart``
    discards that progress); the sanity check must pass before the output appears (``force``).
    ``dry_run`` only checks and estimates (returns the plan). ``save_format``: ``auto``
    (compressed-tensors where it holds every layer, else lowbit's packed layout),
    ``compressed-tensors``, ``lowbit`` or ``fake`` (dense fake-quantized weights).
    """
    from transformers import AutoConfig, AutoTokenizer

    from .pipeline.memory import return_freed_memory_promptly

    start, cpu_start = time.perf_counter(), time.process_time()
    options = options or PipelineOptions()
    if options.tune_allocator:  # before anything allocates: the tokenizer and the calibration set come first
        return_freed_memory_promptly()
    timings = PhaseTimes()
    with timings.phase(LOAD):
        path = resolve_model_path(model_dir)  # a hub id is downloaded here
        recipe = as_recipe(recipe)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception:  # a model without tokenizer can still be quantized data-free
            tokenizer = None
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:  # transformers raises several types for configs it cannot use
            raise ModelLoadError(f"cannot use the config of {path}: {exc}") from None
        calib, held_back = prepare_calibration(
            config, recipe, calibration, tokenizer, n_samples, seq_len, seed, options
        )
    return quantize_directory(
        path,
        recipe,
        out_dir,
        calibration=calib,
        held_back=held_back,
        options=options,
        save_dtype=save_dtype,
        overwrite=overwrite,
        restart=restart,
        force=force,
        dry_run=dry_run,
        tokenizer=tokenizer,
        timings=timings,
        started=(start, cpu_start),
        save_format=save_format,
    )
