"""Quantize a model directory into an output directory: streamed, resumable, checked, atomic.

This is what ``lowbit quantize`` runs. The model is never loaded whole: a weightless skeleton is
built, each block is read from the checkpoint's safetensors when its turn comes and written to
its own output shard when done. Progress is recorded after every block in ``.<OUT>.partial/``; a
run started again with the same command resumes there. The finished directory appears under its
real name only after the sanity check passed and every file was written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..calibration import CalibrationData
from ..export.atomic import OutputExistsError, check_output_dir
from ..export.layouts import choose_layout
from ..export.shards import INDEX, ShardWriter
from ..models import ModelAdapter
from ..models.lazy import LazyModel
from ..recipe import Recipe
from ..report import QuantizationReport, build_report, weight_files_bytes
from .memory import return_freed_memory_promptly, trim
from .options import PipelineOptions
from .plan import Plan, all_linears, check_plan, estimate, mark_followers, rounding_steps
from .resume import RunDirectory
from .sanity import SanityCheckFailed, SanityReport
from .sequential import run_pipeline
from .store import StreamingStore
from .timing import LOAD, WRITE, PhaseTimes

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class DirectoryRun:
    """The outcome of :func:`quantize_directory`."""

    out_dir: Path | None
    report: QuantizationReport | None
    sanity: SanityReport | None = None
    plan: Plan | None = None
    resumed_from_block: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def work_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def fingerprint(
    lazy: LazyModel,
    recipe: Recipe,
    calibration: CalibrationData | None,
    held_back,
    options: PipelineOptions,
    save_dtype,
    layout: str = "fake",
) -> dict:
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return {
        "model files": digest(json.dumps(lazy.checkpoint.fingerprint(), sort_keys=True)),
        "recipe": digest(recipe.to_yaml()),
        "calibration data": (calibration.fingerprint() if calibration is not None else "none")
        + "/"
        + (held_back.fingerprint() if held_back is not None else "none"),
        "options": digest(
            json.dumps(
                {
                    "propagate": options.propagate,
                    "batch_size": options.batch_size,
                    "dtype": str(save_dtype),
                    "compute_dtype": str(options.arithmetic_dtype(lazy.dtype)),
                    "save_format": layout,
                }
            )
        ),
        "lowbit version": __version__,
    }


def quantize_directory(
    model_dir: str | Path,
    recipe: Recipe,
    out_dir: str | Path,
    *,
    calibration: CalibrationData | None = None,
    held_back: CalibrationData | None = None,
    options: PipelineOptions | None = None,
    save_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    restart: bool = False,
    force: bool = False,
    dry_run: bool = False,
    tokenizer: Any = None,
    timings: PhaseTimes | None = None,
    started: tuple[float, float] | None = None,
    save_format: str = "auto",
) -> DirectoryRun:
    """Quantize the checkpoint in ``model_dir`` with ``recipe`` into ``out_dir``.

    ``save_format``: how quantized layers are stored (:mod:`lowbit.export.layouts`): ``auto``
    (compressed-tensors where it can hold every layer, else lowbit's own packed layout),
    ``compressed-tensors``, ``lowbit`` or ``fake`` (dense fake-quantized weights).

    ``timings`` and ``started`` (wall and CPU clock at the start) let a caller that already did
    part of the work (loading the tokenizer, sampling calibration data) count it in the report.
    """
    start, cpu_start = started or (time.perf_counter(), time.process_time())
    timings = timings if timings is not None else PhaseTimes()
    options = options or PipelineOptions()
    out = check_output_dir(out_dir, overwrite)
    if options.tune_allocator:
        # The threshold must be fixed before the skeleton is built: building it allocates every
        # parameter once (untouched) and frees it. Under glibc's default, rising threshold those
        # allocations come from the heap and leave it with free space as large as the model; later
        # tensors reuse that space, and freed heap pages stay resident: some runs of a 1.1B model
        # grew by 1.2 GiB during the first greedy generation (depending on how the heap happened to
        # be laid out after the skeleton), and stayed there until the end of the first block.
        return_freed_memory_promptly()
    with timings.phase(LOAD):
        lazy = LazyModel(model_dir, device=options.resolved_device())
        trim()
    save_dtype = save_dtype or lazy.storage_dtype
    adapter = ModelAdapter(lazy.model)
    if adapter.unfuse_experts() and adapter.arch.moe is not None:
        moe = adapter.arch.moe
        lazy.rename_in_blocks(adapter.blocks_path, moe.model_prefix, moe.checkpoint_prefix)
    targeted = check_plan(adapter, recipe.steps, options.allow_nonfinite)
    mark_followers(recipe.steps, list(targeted))
    rounding = rounding_steps(recipe.steps, list(targeted))
    if save_format == "gguf":
        from ..export.gguf import check_model

        check_model(lazy.model.config.model_type)
    layout = choose_layout(save_format, {n: (s.config.spec, targeted[n], s) for n, s in rounding.items()})
    tokens = calibration.tokens() if calibration is not None else 0
    held_tokens = held_back.tokens() if held_back is not None else 0
    plan = estimate(
        adapter,
        recipe.steps,
        targeted,
        save_dtype,
        tokens,
        streaming=True,
        compute_dtype=options.arithmetic_dtype(lazy.dtype),
        activation_dtype=lazy.dtype,
        out_dir=out,
        held_back_tokens=held_tokens,
        generate_tokens=options.sanity_generate if held_back is not None else 0,
        device=options.resolved_device(),
    )
    plan.notes.append(f"saved as {layout.name}")
    if dry_run:
        return DirectoryRun(None, None, plan=plan)

    work = work_dir_for(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if restart and work.exists():
        shutil.rmtree(work)
    run_dir = RunDirectory(work, fingerprint(lazy, recipe, calibration, held_back, options, save_dtype, layout.name))
    resume = run_dir.load()  # raises ResumeMismatch early, before any work
    writer = ShardWriter(work)
    if resume is not None:
        writer.adopt_existing()
    store = StreamingStore(lazy, writer, save_dtype, layout, {n: s.config.spec for n, s in rounding.items()})
    try:
        result = run_pipeline(
            lazy.model,
            recipe.steps,
            calibration,
            options,
            held_back=held_back,
            store=store,
            run_dir=run_dir,
            timings=timings,
        )
    except BaseException:
        if not run_dir.run_file.exists():  # no block finished: nothing to resume, leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    if result.sanity is not None:
        result.sanity.decode(tokenizer)
    if result.sanity is not None and not result.sanity.passed and not force:
        raise SanityCheckFailed(result.sanity)
    with timings.phase(WRITE):
        _finish_directory(Path(model_dir), work, writer, tokenizer)
        run_dir.cleanup()
    quantized = {name: rounding[name].config.spec for name in result.state.results}
    unquantized = [name for name in all_linears(adapter) if name not in quantized]
    activations = {n: rounding[n].activation_scheme for n in quantized if rounding[n].activation_scheme is not None}
    qconfig = layout.quantization_config(quantized, unquantized, activations)
    report = build_report(
        lazy.model,
        result.state,
        time.perf_counter() - start,
        storage_dtype=save_dtype,
        cpu_seconds=time.process_time() - cpu_start,
        timings=timings.to_dict(),
    )
    report.size_on_disk_bytes = weight_files_bytes(work)
    report.extra.update(
        calibration=calibration.describe() if calibration is not None else None,
        sanity=result.sanity.to_dict() if result.sanity is not None else None,
        peak_rss_bytes=_peak_rss(),
    )
    _write_metadata(Path(model_dir), work, recipe, report, save_dtype, qconfig, result.config_updates)
    if layout.name == "gguf":
        with timings.phase(WRITE):
            _write_gguf(work, save_dtype)
    _publish(work, out, overwrite)
    return DirectoryRun(out, report, result.sanity, plan, resumed_from_block=resume.next_block if resume else 0)


def _peak_rss() -> int:
    from .progress import peak_rss_bytes

    return peak_rss_bytes()


def _finish_directory(source: Path, work: Path, writer: ShardWriter, tokenizer) -> None:
    """The index, and the source's other files (config, tokenizer ...) beside the new weights."""
    writer.write_index()
    for item in source.iterdir():
        if item.name.endswith(_WEIGHT_SUFFIXES) or item.name == INDEX or item.name.startswith("lowbit_"):
            continue
        target = work / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    if tokenizer is not None and not any(
        (work / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    ):
        tokenizer.save_pretrained(work)


def _write_metadata(
    source: Path,
    work: Path,
    recipe: Recipe,
    report: QuantizationReport,
    save_dtype,
    quantization_config,
    config_updates: dict | None = None,
) -> None:
    """The saved dtype and the layout's quantization_config in config.json (with what a model
    transform changed: online rotations, an untied head), the recipe and the report."""
    config = json.loads((work / "config.json").read_text())
    config.update(config_updates or {})
    config["dtype"] = str(save_dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (work / "lowbit_recipe.yaml").write_text(recipe.to_yaml())
    meta = {"lowbit_version": __version__, "source_model": str(source), **report.to_dict()}
    (work / "lowbit_report.json").write_text(json.dumps(meta, indent=2) + "\n")


def _write_gguf(work: Path, save_dtype: torch.dtype) -> None:
    """``model.gguf`` from the finished packed checkpoint (read back as any lowbit checkpoint)."""
    from ..export.gguf import write_gguf
    from ..runtime import load

    loaded = load(work, dtype=save_dtype, native_kernels=False)
    write_gguf(loaded.model, work, work / "model.gguf")


def _publish(work: Path, out: Path, overwrite: bool) -> None:
    """Give the finished directory its real name (replacing an old one only with overwrite)."""
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"output directory {out} appeared while the run was going; not replacing it")
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(out)
