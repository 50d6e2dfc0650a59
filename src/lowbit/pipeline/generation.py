"""Short greedy generation, one block at a time, for the sanity check.

The model may be a weightless skeleton whose blocks are read from disk (streaming runs), so the
generation runs the whole sequence through the blocks once per new token, loading and releasing
each block around its turn (and the embeddings and the head around theirs): no KV cache to thread
through block calls of every architecture, and no more memory than the pipeline itself needs. A
few new tokens over a short prompt cost a few passes over the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import CalibrationData
from ..models import ModelAdapter
from .tensors import first_tensor, to_device


@dataclass
class OutsideLoader:
    """Loads the embeddings or the final norm and head, and drops them again. With the weights on
    disk, a generation then holds one of them at a time: for a large vocabulary each is as big as
    several blocks, and re-reading them once per new token costs little next to the blocks."""

    load_embeddings: Callable[[], None]
    load_head: Callable[[], None]
    release: Callable[[], None]


@torch.no_grad()
def greedy_continuation(
    model: nn.Module,
    adapter: ModelAdapter,
    prompt: torch.Tensor,
    new_tokens: int,
    options,
    head: Callable[[torch.Tensor], torch.Tensor],
    load_block: Callable[[int], None] = lambda i: None,
    release_block: Callable[[int], None] = lambda i: None,
    head_device: torch.device | str = "cpu",
    outside: OutsideLoader | None = None,
) -> tuple[list[int], bool]:
    """Greedy continuation of ``prompt`` (``[tokens]``); returns the new token ids and whether any
    logits were NaN/Inf. Modules before the first block and ``head`` must be usable, unless
    ``outside`` loads them in turn (and releases them again) around each pass."""
    from .sequential import capture_first_block_inputs

    device = options.resolved_device()
    ids = prompt.reshape(1, -1).to(torch.long)
    generated: list[int] = []
    nonfinite = False
    for _ in range(new_tokens):
        if outside is not None:
            outside.load_embeddings()
        inputs = capture_first_block_inputs(model, adapter, CalibrationData(ids, source="generation"), options)
        if outside is not None:
            outside.release()
        h, args, kwargs = inputs.hidden[0].to(device), inputs.args[0], inputs.kwargs[0]
        for index in range(len(adapter)):
            load_block(index)
            block = adapter.blocks[index]
            home = next(block.parameters()).device
            block.to(device)
            h = first_tensor(block(h, *to_device(args, device), **to_device(kwargs, device)))
            block.to(home)
            release_block(index)
        if outside is not None:
            outside.load_head()
        logits = head(h[:, -1:].to(head_device)).float()
        if outside is not None:
            outside.release()
        if not torch.isfinite(logits).all():
            nonfinite = True
            break
        token = int(logits[0, -1].argmax())
        generated.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return generated, nonfinite


def repeats_one_token(tokens: list[int]) -> bool:
    return len(tokens) > 1 and len(set(tokens)) == 1
