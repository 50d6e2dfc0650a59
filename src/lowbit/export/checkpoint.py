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
