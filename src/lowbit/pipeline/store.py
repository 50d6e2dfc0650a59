"""Where block weights come from and where finished blocks go.

:class:`InMemoryStore`: the model is already in memory and is quantized in place.
:class:`StreamingStore`: the model is a weightless skeleton; each block is read from the
safetensors checkpoint when its turn comes, written to its own output shard as soon as it is
quantized, and dropped from memory. Peak memory is then about one block plus activations.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..export.shards import ShardWriter
from ..models import ModelAdapter
from ..models.lazy import LazyModel

log = logging.getLogger(__name__)


class InMemoryStore:
    streaming = False

    def prepare(self, adapter: ModelAdapter) -> None:
        pass

    def load_block(self, adapter: ModelAdapter, index: int) -> None:
        pass

    def finish_block(self, adapter: ModelAdapter, index: int) -> None:
        pass

    def finish(self, adapter: ModelAdapter) -> None:
        adapter.refuse_experts()  # give the model back in its own (fused) module layout


class StreamingStore:
    streaming = True

    def __init__(self, lazy: LazyModel, writer: ShardWriter, save_dtype: torch.dtype | None = None):
        self.lazy = lazy
        self.writer = writer
        self.save_dtype = save_dtype or lazy.dtype

    def prepare(self, adapter: ModelAdapter) -> None:
        self.lazy.materialize_outside(adapter.blocks_path)

    def load_block(self, adapter: ModelAdapter, index: int) -> None:
        self.lazy.materialize(adapter.blocks[index], adapter.block_name(index))

    def finish_block(self, adapter: ModelAdapter, index: int) -> None:
        block = adapter.blocks[index]
        prefix = adapter.block_name(index)
        tensors = {self.lazy.checkpoint_name(f"{prefix}.{k}"): self._cast(v) for k, v in block.state_dict().items()}
        self.writer.write(f"block-{index:05d}", tensors)
        self.lazy.release(block)

    def finish(self, adapter: ModelAdapter) -> None:
        """Write everything outside the blocks (embeddings, final norm, head) as the last shard."""
        inside = adapter.blocks_path + "."
        tied = getattr(self.lazy.model.config, "tie_word_embeddings", False)
        tensors, seen = {}, set()
        for name, value in self.lazy.model.state_dict(keep_vars=True).items():
            if name.startswith(inside) or value.device.type == "meta":
                continue
            key = value.data_ptr()
            if key in seen or (tied and name.endswith("lm_head.weight")):
                continue  # tied weights are stored once, under the embedding's name
            seen.add(key)
            tensors[self.lazy.checkpoint_name(name)] = self._cast(value.detach())
        self.writer.write("rest", tensors)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.save_dtype) if t.is_floating_point() else t


def block_nbytes(block: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in block.parameters())
