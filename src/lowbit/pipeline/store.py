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
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from ..algorithms.base import ModelTransform
from ..export.layouts import FakeQuantLayout, Layout
from ..export.shards import ShardWriter
from ..formats import FormatSpec, QuantizedTensor, Quantizer
from ..models import ModelAdapter
from ..models.lazy import LazyModel, SafetensorsCheckpoint

log = logging.getLogger(__name__)


class InMemoryStore:
    streaming = False
    keeps_codes = False

    transform: ModelTransform | None = None

    def set_transform(self, adapter: ModelAdapter, transform: ModelTransform) -> None:
        """The model is transformed from now on: its outside weights change at once."""
        self.transform = transform
        transform.rotate_model_outside(adapter.model)

    def load_outside(self, adapter: ModelAdapter) -> None:
        pass

    def load_all(self, adapter: ModelAdapter) -> None:
        pass

    def release_all(self, adapter: ModelAdapter) -> None:
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

    def finish_block(self, adapter: ModelAdapter, index: int, codes: dict[str, QuantizedTensor]) -> None:
        pass

    def finish(self, adapter: ModelAdapter, codes: dict[str, QuantizedTensor]) -> None:
        adapter.refuse_experts()  # give the model back in its own (fused) module layout
        if self.transform is not None:  # the saved config says what the transform changed
            for key, value in self.transform.config_updates().items():
                setattr(adapter.model.config, key, value)


class StreamingStore:
    """``layout`` decides how a quantized linear is written (packed codes, or dense fake-quant
    weights); a packing layout needs each block's codes, which are dropped once written."""

    streaming = True

    def __init__(
        self,
        lazy: LazyModel,
        writer: ShardWriter,
        save_dtype: torch.dtype | None = None,
        layout: Layout | None = None,
        specs: dict[str, FormatSpec] | None = None,
    ):
        """``specs``: the format each layer is rounded to (to read packed layers back)."""
        self.lazy = lazy
        self.writer = writer
        self.save_dtype = save_dtype or lazy.storage_dtype
        self.layout = layout or FakeQuantLayout()
        self.specs = specs or {}
        self.transform: ModelTransform | None = None
        self._transformed: set[str] = set()  # outside parameters in memory that hold transformed values

    def set_transform(self, adapter: ModelAdapter, transform: ModelTransform) -> None:
        """The model is transformed from now on: outside weights change as they are loaded and written
        (a large vocabulary's embeddings are never held just for this)."""
        self.transform = transform
        transform.untie(self.lazy.model)
        self.release_outside(adapter)
        self._transformed.clear()

    def _transform_loaded(self) -> None:
        if self.transform is None:
            return
        model = self.lazy.model
        roles = self.transform.outside_roles()
        norm_name = next(n for n, r in roles.items() if r == "norm")
        original_norm = None
        for name, role in roles.items():
            param = model.get_parameter(name)
            if param.device.type == "meta" or name in self._transformed:
                continue
            if original_norm is None:
                original_norm = self.lazy.read(norm_name)
            param.data = self.transform.rotate_outside(role, param.data, original_norm)
            self._transformed.add(name)

    @property
    def keeps_codes(self) -> bool:
        return self.layout.packs

    def load_all(self, adapter: ModelAdapter) -> None:
        """Every weight of the model (for a transform learned on the whole model: SpinQuant)."""
        self.lazy.materialize(self.lazy.model, "")
        if getattr(self.lazy.model.config, "tie_word_embeddings", False):
            self.lazy.model.tie_weights()

    def release_all(self, adapter: ModelAdapter) -> None:
        self.lazy.release(self.lazy.model)
        self._transformed.clear()

    def load_outside(self, adapter: ModelAdapter) -> None:
        """What runs before the first block (embeddings), for capturing that block's inputs; the
        final norm and the head wait for :meth:`load_head`."""
        self.lazy.materialize_outside(adapter.blocks_path, skip=tuple(adapter.head_modules()))
        self._transform_loaded()

    def release_outside(self, adapter: ModelAdapter) -> None:
        """Drop them again while the blocks are worked on (the embeddings of a large vocabulary
        would otherwise sit in memory all run)."""
        for name, module in adapter.outside_modules().items():
            if any(p.device.type != "meta" for p in module.parameters(recurse=False)):
                self.lazy.release(module)
                self._transformed.difference_update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))

    def load_head(self, adapter: ModelAdapter, linears: Iterable[str] = ()) -> None:
        """What runs after the last block (final norm, output projection, pooler), for the head unit
        and the sanity check, and the other outside ``linears`` the recipe quantizes."""
        modules = {**adapter.head_modules(), **{name: adapter.model.get_submodule(name) for name in linears}}
        for name, module in modules.items():
            self.lazy.materialize(module, name)
        self._transform_loaded()

    def load_block(self, adapter: ModelAdapter, index: int) -> None:
        self.lazy.materialize(adapter.blocks[index], adapter.block_name(index))

    def release_block(self, adapter: ModelAdapter, index: int) -> None:
        self.lazy.release(adapter.blocks[index])

    def load_output_block(self, adapter: ModelAdapter, index: int) -> None:
        """A finished block, read back from the shard it was written to (packed layers dequantized from
        what the layout wrote: the check sees the checkpoint, not lowbit's memory of it)."""
        shard = SafetensorsCheckpoint.single_file(self.writer.directory / f"model-block-{index:05d}.safetensors")
        block, prefix = adapter.blocks[index], adapter.block_name(index)
        packed = {}
        for name, module in adapter.block_linears(index).items():
            stem = self.lazy.checkpoint_name(f"{name}.weight").removesuffix("weight")
            if name in self.specs and stem + "weight" not in shard:
                packed[name] = (module, stem)
        self.lazy.materialize(block, prefix, source=shard, skip={f"{name}.weight" for name in packed})
        for name, (module, stem) in packed.items():
            leaves = {key.removeprefix(stem): t for key, t in shard.get_many(shard.keys_with_prefix(stem)).items()}
            q = self.layout.read_layer(leaves, self.specs[name])
            weight = Quantizer(q.spec).dequantize(q).to(self.lazy.dtype)
            set_module_tensor_to_device(
                block, f"{name.removeprefix(prefix + '.')}.weight", "cpu", value=_as_stored(module, weight)
            )

    def saved_tensors(self, index: int, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (model names) as block ``index``'s shard holds them."""
        shard = SafetensorsCheckpoint.single_file(self.writer.directory / f"model-block-{index:05d}.safetensors")
        keys = {name: self.lazy.checkpoint_name(name) for name in names}
        values = shard.get_many(list(keys.values()))
        return {name: values[key] for name, key in keys.items()}

    def finish_block(self, adapter: ModelAdapter, index: int, codes: dict[str, QuantizedTensor]) -> None:
        block = adapter.blocks[index]
        prefix = adapter.block_name(index)
        tensors = {}
        for k, v in block.state_dict().items():
            tensors.update(self._stored(f"{prefix}.{k}", v, codes))
        self.writer.write(f"block-{index:05d}", tensors)
        self.lazy.release(block)

    def _stored(self, name: str, value: torch.Tensor, codes: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
        """What a parameter becomes on disk: a quantized linear's weight the layout's tensors (its codes
        are dropped once written), anything else itself in the saved dtype."""
        key = self.lazy.checkpoint_name(name)
        layer = name.removesuffix(".weight")
        if not (self.layout.packs and name.endswith(".weight") and layer in codes):
            return {key: self._cast(value)}
        stem = key.removesuffix("weight")
        return {stem + leaf: t for leaf, t in self.layout.layer_tensors(codes.pop(layer), self.save_dtype).items()}

    def finish(self, adapter: ModelAdapter, codes: dict[str, QuantizedTensor], shard_bytes: int = 64 * 2**20) -> None:
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
            nbytes = value.numel() * value.element_size()
            if pending and size + nbytes > shard_bytes:
                self.writer.write(f"rest-{part:02d}", pending)
                pending, size, part = {}, 0, part + 1
            if value.device.type != "meta":
                tensor = value.detach()
            else:
                tensor = self.lazy.read(name)
                if self.transform is not None and name in (roles := self.transform.outside_roles()):
                    norm = self.lazy.read(next(n for n, r in roles.items() if r == "norm"))
                    tensor = self.transform.rotate_outside(roles[name], tensor, norm)
            pending.update(self._stored(name, tensor, codes))
            size += nbytes
        if pending:
            self.writer.write(f"rest-{part:02d}", pending)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.save_dtype) if t.is_floating_point() else t


def _as_stored(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An ``[out, in]`` weight as ``module`` stores it (GPT-2's Conv1D keeps ``[in, out]``)."""
    return weight.t().contiguous() if tuple(module.weight.shape) != tuple(weight.shape) else weight


def block_nbytes(block: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in block.parameters())
