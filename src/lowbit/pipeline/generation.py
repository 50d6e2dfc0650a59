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
from .capture import capture_first_block_inputs
from .tensors import computing_in, first_tensor, to_device


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
            dtype = options.arithmetic_dtype(h.dtype, device)
            with computing_in([block], dtype):
                out = first_tensor(
                    block(h.to(dtype), *to_device(args, device, dtype), **to_device(kwargs, device, dtype))
                )
            h = out.to(inputs.hidden[0].dtype)
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


def prompt_of(held_back: CalibrationData) -> torch.Tensor:
    """The sanity check's prompt: the start of the first held-back sample."""
    return held_back.input_ids[0, : min(16, held_back.seq_len)]


def logits_of(norm: nn.Module | None, head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda h: head(norm(h) if norm is not None else h)


def generate_with_store(
    model, adapter: ModelAdapter, held_back: CalibrationData, options, store, output: bool, swap_outside=True
):
    """Greedy continuation of :func:`prompt_of` ``held_back``, blocks loaded in turn from ``store``
    (the finished ones from the output when ``output``); with ``swap_outside``, the embeddings
    and the head too (a no-op for a model in memory)."""
    _, norm = adapter.final_norm()
    _, head = adapter.lm_head()
    head_device = next(head.parameters()).device
    outside = None
    if swap_outside:
        outside = OutsideLoader(
            load_embeddings=lambda: store.load_outside(adapter),
            load_head=lambda: store.load_head(adapter),
            release=lambda: store.release_outside(adapter),
        )
        if head_device.type == "meta":  # released now; the store loads weights onto the CPU
            head_device = torch.device("cpu")
    return greedy_continuation(
        model,
        adapter,
        prompt_of(held_back),
        options.sanity_generate,
        options,
        logits_of(norm, head),
        load_block=lambda i: (store.load_output_block if output else store.load_block)(adapter, i),
        release_block=lambda i: store.release_block(adapter, i),
        head_device=head_device,
        outside=outside,
    )


def repeats_one_token(tokens: list[int]) -> bool:
    return len(tokens) > 1 and len(set(tokens)) == 1
