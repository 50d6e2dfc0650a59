"""Where block weights come from and where finished blocks go.

:class:`InMemoryStore`: the model is already in memory and is quantized in place.
:class:`StreamingStore`: the model is a weightless skeleton; each block is read from the
safetensors checkpoint when its turn comes, written to its own output shard as soon as it is
quantized, and dropped from memory. Peak memory is then about one block plus activations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..export.shards import ShardWriter
from ..models import ModelAdapter
from ..models.lazy import LazyModel, SafetensorsCheckpoint

log = logging.getLogger(__name__)


class InMemoryStore:
    streaming = False

    def load_outside(self, adapter: ModelAdapter) -> None:
        pass

    def release_outside(self, adapter: ModelAdapter) -> None:
        pass

    def load_head(self, adapter: ModelAdapter, linears: Iterable[str] = ()) -> None:
        pass

    def load_block(self, adapter: ModelAdapter, index: int) -> None:
        pass

    def release_block(self, adapter: ModelAdapter, index: int) -> None:
        pass

    def load_output_block(self, adapter: ModelAdapter, index: int) -> None:
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
        self.save_dtype = save_dtype or lazy.storage_dtype

    def load_outside(self, adapter: ModelAdapter) -> None:
        """What runs before the first block (embeddings), for capturing that block's inputs; the
        final norm and the head wait for :meth:`load_head`."""
        self.lazy.materialize_outside(adapter.blocks_path, skip=tuple(adapter.head_modules()))

    def release_outside(self, adapter: ModelAdapter) -> None:
        """Drop them again while the blocks are worked on (the embeddings of a large vocabulary
        would otherwise sit in memory all run)."""
        for module in adapter.outside_modules().values():
            if any(p.device.type != "meta" for p in module.parameters(recurse=False)):
                self.lazy.release(module)

    def load_head(self, adapter: ModelAdapter, linears: Iterable[str] = ()) -> None:
        """What runs after the last block (final norm, output projection, pooler), for the head unit
        and the sanity check, and the other outside ``linears`` the recipe quantizes."""
        modules = {**adapter.head_modules(), **{name: adapter.model.get_submodule(name) for name in linears}}
        for name, module in modules.items():
            self.lazy.materialize(module, name)

    def load_block(self, adapter: ModelAdapter, index: int) -> None:
        self.lazy.materialize(adapter.blocks[index], adapter.block_name(index))

    def release_block(self, adapter: ModelAdapter, index: int) -> None:
        self.lazy.release(adapter.blocks[index])

    def load_output_block(self, adapter: ModelAdapter, index: int) -> None:
        """A finished block, read back from the shard it was written to."""
        shard = SafetensorsCheckpoint.single_file(self.writer.directory / f"model-block-{index:05d}.safetensors")
        self.lazy.materialize(adapter.blocks[index], adapter.block_name(index), source=shard)

    def finish_block(self, adapter: ModelAdapter, index: int) -> None:
        block = adapter.blocks[index]
        prefix = adapter.block_name(index)
        tensors = {self.lazy.checkpoint_name(f"{prefix}.{k}"): self._cast(v) for k, v in block.state_dict().items()}
        self.writer.write(f"block-{index:05d}", tensors)
        self.lazy.release(block)

    def finish(self, adapter: ModelAdapter, shard_bytes: int = 64 * 2**20) -> None:
        """Write everything outside the blocks (embeddings, final norm, head), a few tensors at a
        time: those in memory (e.g. a quantized head) as they are, the rest straight from the source.
        A shard holds tensors up to ``shard_bytes`` together, or one larger tensor alone: a large
        vocabulary's embeddings and head are each several blocks' worth, never read at once."""
        inside = adapter.blocks_path + "."
        tied = getattr(self.lazy.model.config, "tie_word_embeddings", False)
        pending: dict[str, torch.Tensor] = {}
        size, part, seen = 0, 0, set()
        for name, value in self.lazy.model.named_parameters(remove_duplicate=False):
            if name.startswith(inside) or name in seen or (tied and name.endswith("lm_head.weight")):
                continue  # tied weights are stored once, under the embedding's name
            seen.add(name)
            key = self.lazy.checkpoint_name(name)
            nbytes = value.numel() * value.element_size()
            if pending and size + nbytes > shard_bytes:
                self.writer.write(f"rest-{part:02d}", pending)
                pending, size, part = {}, 0, part + 1
            tensor = value.detach() if value.device.type != "meta" else self.lazy.checkpoint.get(key)
            pending[key] = self._cast(tensor)
            size += nbytes
        if pending:
            self.writer.write(f"rest-{part:02d}", pending)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.save_dtype) if t.is_floating_point() else t


def block_nbytes(block: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in block.parameters())
