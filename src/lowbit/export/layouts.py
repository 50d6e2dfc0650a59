"""How a quantized layer is stored in a checkpoint: the tensors that replace its dense weight, and
the ``quantization_config`` that tells a loader how to read them.

A layout is chosen once per save (``--save-format``). ``fake`` keeps dense, fake-quantized
weights; ``compressed-tensors`` is what vLLM and transformers read; ``lowbit`` holds every lowbit
format losslessly (read back by :func:`lowbit.load`); ``gguf`` is lowbit's layout plus a GGUF file
for llama.cpp. ``auto`` takes compressed-tensors where it can
hold every quantized layer's format, else lowbit's own layout. The streaming pipeline writes a
block's tensors as soon as the block is quantized (the whole model's codes are never held), and the
configuration once at the end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..formats import FormatSpec, QuantizedTensor, Quantizer
from ..formats.activations import ActivationScheme


class ExportError(ValueError):
    """The chosen checkpoint layout cannot hold a layer's format (or the model's structure)."""


class Layout(ABC):
    """A way of storing quantized linears. ``packs``: whether it needs each layer's codes."""

    name: ClassVar[str]
    packs: ClassVar[bool] = True
    #: whether the layout records how layers quantize their inputs (activation quantization)
    holds_activations: ClassVar[bool] = False

    def check(
        self, layer: str, spec: FormatSpec, module: torch.nn.Module, step: Any = None, q: QuantizedTensor | None = None
    ) -> None:
        """Raise :class:`ExportError` if this layout cannot hold ``layer`` (``module``) rounded by
        ``step`` in ``spec`` (before any work, for every planned layer), or its codes ``q`` when
        they exist already. The default holds everything."""
        return None

    def check_activation(self, scheme: ActivationScheme) -> None:
        """Raise :class:`ExportError` if this layout cannot record inputs quantized by ``scheme`` so
        that its loaders compute them as lowbit does."""
        return None

    @abstractmethod
    def layer_tensors(self, q: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors that replace the layer's ``weight``, by their leaf names (``weight_packed`` ...).
        ``dtype`` is the checkpoint's floating-point dtype."""

    def read_layer(self, leaves: Mapping[str, torch.Tensor], spec: FormatSpec) -> QuantizedTensor:
        """The inverse of :meth:`layer_tensors`: the codes and parameters a layer's stored tensors hold."""
        raise ExportError(f"the {self.name} layout stores no codes to read back")

    @abstractmethod
    def quantization_config(
        self,
        layers: Mapping[str, FormatSpec],
        unquantized: list[str],
        activations: Mapping[str, ActivationScheme] | None = None,
    ) -> dict[str, Any] | None:
        """``config.json``'s ``quantization_config`` for these quantized layers (name -> format), the
        ``activations`` schemes of those that quantize their inputs; the model's other linears are
        ``unquantized``. ``None``: none (a plain checkpoint)."""


class FakeQuantLayout(Layout):
    """Dense weights holding the dequantized values, in the checkpoint's dtype: any loader reads it, no
    engine sees it as quantized (same size as the original)."""

    name = "fake"
    packs = False

    def layer_tensors(self, q: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"weight": Quantizer(q.spec).dequantize(q).to(dtype)}

    def quantization_config(self, layers, unquantized, activations=None):
        return None


LAYOUTS: dict[str, type[Layout]] = {FakeQuantLayout.name: FakeQuantLayout}


def register_layout(cls: type[Layout]) -> type[Layout]:
    LAYOUTS[cls.name] = cls
    return cls


def make_layout(name: str) -> Layout:
    from . import compressed_tensors, gguf, lowbit_packed  # noqa: F401  (importing registers them)

    if name not in LAYOUTS:
        raise ExportError(f"unknown save format {name!r}; known: auto, {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[name]()


def choose_layout(name: str, layers: Mapping[str, tuple], activations: list[ActivationScheme] | None = None) -> Layout:
    """The layout for ``name``; ``auto``: compressed-tensors if it holds every layer (``name -> (spec,
    module, step[, codes])``: the arguments of :meth:`Layout.check`) and every input scheme (those of
    the steps, and ``activations``), else lowbit's own. An explicit layout that cannot hold a layer
    fails here, naming the layer and why."""
    steps = [args[2] for args in layers.values() if len(args) > 2 and args[2] is not None]
    schemes = [s.activation_scheme for s in steps] + list(activations or [])
    if name == "auto":
        ct = make_layout("compressed-tensors")
        try:
            for layer, args in layers.items():
                ct.check(layer, *args)
            check_activations(ct, schemes)
        except ExportError:
            return make_layout("lowbit")
        return ct
    layout = make_layout(name)
    for layer, args in layers.items():
        layout.check(layer, *args)
    check_activations(layout, schemes)
    return layout


def check_activations(layout: Layout, schemes: list[ActivationScheme | None]) -> None:
    """Refuse a layout that would drop (or misstate) the activation quantization of some layer."""
    for scheme in {s for s in schemes if s is not None}:
        if not layout.holds_activations:
            raise ExportError(
                f"the {layout.name} layout cannot record activation quantization ({scheme.label()}); "
                "save with --save-format compressed-tensors or lowbit"
            )
        layout.check_activation(scheme)
