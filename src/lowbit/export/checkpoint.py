"""Save a (fake-quantized) model as a normal Hugging Face directory plus lowbit's metadata."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_directory

log = logging.getLogger(__name__)


def save_model_dir(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, str | Callable[[Path], str]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (safetensors + config), its tokenizer and ``extra_files`` atomically.

    ``dtype`` converts floating-point tensors on the way out (the model itself is not changed).
    ``extra_files`` maps names to text, or to a function of the directory being written that
    returns the text (called after everything else is written).
    """
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        state = model.state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if dtype is not None:
            _set_config_dtype(tmp / "config.json", dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text if isinstance(text, str) else text(tmp))
    log.info("saved %s", out_dir)
    return Path(out_dir)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    cfg = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    cfg.pop("torch_dtype", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_packed_model_dir(
    model: nn.Module,
    out_dir: str | Path,
    quantized: dict[str, Any],
    layout: Any,
    unquantized: list[str],
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, str | Callable[[Path], str]] | None = None,
    overwrite: bool = False,
    activations: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` with its ``quantized`` layers (name -> codes) stored by ``layout`` (the
    tensors of :meth:`~lowbit.export.layouts.Layout.layer_tensors` in place of their weights) and the
    layout's ``quantization_config`` in config.json, atomically."""
    from .layouts import ExportError
    from .shards import ShardWriter

    state = model.state_dict()
    missing = [name for name in quantized if f"{name}.weight" not in state]
    if missing:
        raise ExportError(
            f"{missing[0]} is not a weight of the model as it is saved (fused Mixture-of-Experts tensors?); "
            "save packed MoE checkpoints from the streaming path (lowbit quantize / quantize_checkpoint)"
        )
    dtype = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, value in state.items():
            if value.data_ptr() in seen and value.numel():  # tied weights are stored once
                continue
            seen.add(value.data_ptr())
            layer = name.removesuffix(".weight")
            if name.endswith(".weight") and layer in quantized:
                for leaf, t in layout.layer_tensors(quantized[layer], dtype).items():
                    tensors[f"{layer}.{leaf}"] = t
            else:
                tensors[name] = value.to(dtype) if value.is_floating_point() else value
        writer = ShardWriter(tmp)
        writer.write("00001-of-00001", tensors)
        writer.write_index()
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        qconfig = layout.quantization_config({n: q.spec for n, q in quantized.items()}, unquantized, activations)
        if qconfig is not None:
            config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text if isinstance(text, str) else text(tmp))
    log.info("saved %s (%s)", out_dir, layout.name)
    return Path(out_dir)
