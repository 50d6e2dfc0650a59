"""``lowbit.load(dir)``: a model ready to run, its quantized layers kept packed in memory.

Every checkpoint lowbit writes (compressed-tensors, its own packed layout, fake-quantized) and
compressed-tensors checkpoints of other tools load the same way: the model is built without weights,
its dense tensors are read from the safetensors files, and each quantized linear becomes a
:class:`~.packed_linear.PackedLinear` holding its codes and scales as stored (``packed=False``:
dequantized into an ordinary ``nn.Linear`` instead, e.g. to quantize the model again).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from ..algorithms.hadamard import attach_online_rotations
from ..formats import Quantizer
from ..formats.activations import ActivationScheme, attach_input_quantizer
from ..models.lazy import LazyModel
from ..models.loading import LoadedModel, ModelLoadError, resolve_model_path
from .checkpoint import quantized_layers
from .packed_linear import PackedLinear, crossover_rows

log = logging.getLogger(__name__)


def load(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    packed: bool = True,
    native_kernels: bool = True,
) -> LoadedModel:
    """Load a model (a built-in name, a directory or a hub id) with its tokenizer.

    ``dtype``: what the model computes in (default: the checkpoint's, float32 for float16
    checkpoints on the CPU). ``packed``: keep quantized layers packed (default) or dequantize them.
    ``native_kernels``: let packed layers use torch's weight-only int4/int8 kernels (which compute in
    bfloat16) where they are faster; ``False`` dequantizes per call and computes exactly in ``dtype``.
    """
    path = resolve_model_path(name_or_path)
    device = torch.device(device)
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}/config.json: {exc}") from None
    lazy = LazyModel(path, dtype=dtype, device=device)
    model = lazy.model
    _unfuse_experts(lazy)
    found = quantized_layers(config.get("quantization_config"), model, lambda n, leaf: _stored_dtype(lazy, n, leaf))
    layout, specs, schemes = found if found is not None else (None, {}, {})
    stems = {name: lazy.checkpoint_name(f"{name}.weight").removesuffix("weight") for name in specs}
    skip = {f"{name}.weight" for name in specs}
    lazy.materialize(model, "", skip=skip)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    elif packed and device.type == "cpu":
        _map_input_embeddings(lazy, model)
    for name, spec in specs.items():
        leaves = {
            key.removeprefix(stems[name]): t
            for key, t in lazy.checkpoint.get_many(lazy.checkpoint.keys_with_prefix(stems[name])).items()
        }
        q = layout.read_layer(leaves, spec)
        module = model.get_submodule(name)
        if packed:
            _replace(model, name, PackedLinear.from_quantized(q, module.bias, lazy.dtype, native_kernels))
        else:
            weight = Quantizer(q.spec).dequantize(q).to(lazy.dtype)
            set_module_tensor_to_device(model, f"{name}.weight", "cpu", value=weight)
    if specs:
        log.info("%d quantized layers (%s), %s", len(specs), layout.name, "packed" if packed else "dequantized")
    rotations = config.get("lowbit_online_rotations") or []
    if rotations:  # before the input quantizers: they quantize the rotated input
        log.info("%d layers rotate their inputs online", attach_online_rotations(model, rotations))
    _attach_input_quantizers(lazy, model, schemes)
    if (
        packed and native_kernels and device.type == "cpu"
    ):  # measure which matmul wins at which batch now, not in the first forward
        for kernel in {m.kernel for m in model.modules() if isinstance(m, PackedLinear)} - {"dequantize"}:
            crossover_rows(kernel, lazy.dtype)
    model.eval().to(device)
    return LoadedModel(model=model, tokenizer=_tokenizer(path), path=path, kind=lazy.kind, name=str(name_or_path))


def _attach_input_quantizers(lazy: LazyModel, model: nn.Module, schemes: dict[str, ActivationScheme]) -> None:
    """Quantize the inputs of the layers the checkpoint says, static scales from ``input_scale``."""
    for name, scheme in schemes.items():
        scale = None
        if not scheme.dynamic:
            key = lazy.checkpoint_name(f"{name}.weight").removesuffix("weight") + "input_scale"
            if key not in lazy.checkpoint:
                raise ModelLoadError(f"{name}: static input activations without {key} in the checkpoint")
            scale = lazy.checkpoint.get(key).float()
        attach_input_quantizer(model.get_submodule(name), scheme, scale)
    if schemes:
        log.info(
            "%d layers quantize their inputs (%s)",
            len(schemes),
            ", ".join(sorted({s.label() for s in schemes.values()})),
        )


def _unfuse_experts(lazy: LazyModel) -> None:
    """Mixture-of-Experts blocks as one linear per expert projection, as checkpoints store them (and
    as lowbit quantizes them): transformers' fused expert tensors cannot be read from those names."""
    from ..models import ModelAdapter, UnsupportedArchitectureError

    try:
        adapter = ModelAdapter(lazy.model)
    except UnsupportedArchitectureError:
        return
    if adapter.unfuse_experts() and adapter.arch.moe is not None:
        moe = adapter.arch.moe
        lazy.rename_in_blocks(adapter.blocks_path, moe.model_prefix, moe.checkpoint_prefix)


def _stored_dtype(lazy: LazyModel, layer: str, leaf: str) -> torch.dtype | None:
    key = lazy.checkpoint_name(f"{layer}.weight").removesuffix("weight") + leaf
    return lazy.checkpoint.dtype_of(key) if key in lazy.checkpoint else None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _map_input_embeddings(lazy: LazyModel, model: nn.Module) -> None:
    """Leave the input embedding table in the file, memory-mapped: a generation reads a few of its
    rows (a 32000 x 2048 bf16 table is 0.12 GiB of resident memory otherwise). Only where the model
    computes in the stored dtype and the head is a separate tensor."""
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    name = next((n for n, p in model.named_parameters() if p is weight), None)
    if name is None:
        return
    key = lazy.checkpoint_name(name)
    if key not in lazy.checkpoint or lazy.checkpoint.dtype_of(key) != weight.dtype:
        return
    mapped = lazy.checkpoint.mapped(key)
    if mapped is not None and mapped.shape == weight.shape:
        embeddings.weight = nn.Parameter(mapped, requires_grad=False)


def _tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("no usable tokenizer in %s (%s)", path, exc)
        return None
