"""The calibration inputs of the first block: the model runs up to it and stops."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calibration import CalibrationData, CalibrationError
from ..models import ModelAdapter
from .tensors import to_device
from .unit import BlockInputs

if TYPE_CHECKING:  # options import the sanity check, whose generation captures in turn
    from .options import PipelineOptions


class _CaptureDone(Exception):
    pass


@torch.no_grad()
def capture_first_block_inputs(
    model: nn.Module, adapter: ModelAdapter, calibration: CalibrationData, options: PipelineOptions
) -> BlockInputs:
    """Run the model up to the first block for every calibration batch; keep that block's inputs."""
    device = options.resolved_device()
    first = adapter.blocks[0]
    hidden, args, kwargs = [], [], []

    def hook(_mod, a, kw):
        kw = dict(kw)
        h = a[0] if a else kw.pop("hidden_states")
        hidden.append(h.detach().to("cpu"))
        args.append(to_device(tuple(a[1:]), "cpu"))
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        kwargs.append(to_device(kw, "cpu"))
        raise _CaptureDone

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    moved = _move_outside_blocks(model, adapter, device)
    try:
        for batch in calibration.batches(options.batch_size):
            batch = to_device(batch, device)
            try:
                try:
                    model(**batch, use_cache=False)
                except TypeError:
                    model(**batch)
            except _CaptureDone:
                pass
    finally:
        handle.remove()
        _move_back(moved)
    if not hidden:
        raise CalibrationError("calibration produced no inputs for the first block")
    return BlockInputs(hidden, args, kwargs)


def _move_outside_blocks(model: nn.Module, adapter: ModelAdapter, device: torch.device) -> list:
    moved = []
    prefix = adapter.blocks_path + "."
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(prefix) and t.device != device and t.device.type != "meta":
            moved.append((t, t.data))
            t.data = t.data.to(device)
    return moved


def _move_back(moved: list) -> None:
    for t, data in moved:
        t.data = data
