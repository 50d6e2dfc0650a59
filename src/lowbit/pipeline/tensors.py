"""Moving nested call arguments (tensors inside tuples, lists, dicts) between devices and dtypes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def to_device(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """``obj`` with every tensor on ``device``; with ``dtype``, floating-point tensors cast to it."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device, dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def computing_in(modules: Iterable[nn.Module | None], dtype: torch.dtype | None) -> Iterator[None]:
    """Compute ``modules`` in ``dtype`` for the duration, each tensor back to its own dtype afterwards
    (a module may mix dtypes: fp32 norms in a bf16 model).

    Linear layers keep their weights as stored and cast them per call: a float32 copy of a whole
    block would sit beside the algorithms' own working memory (a 1.1B bf16 block is 0.08 GiB, its
    float32 copy 0.16), where one layer's copy lives only for its matmul. Other modules (norms,
    rotary tables, Conv1D) are cast in place; the tensors stay the same objects, so hooks and
    references to them hold."""
    changed: list[tuple[torch.Tensor, torch.dtype]] = []
    linears: list[tuple[nn.Linear, dict[str, torch.dtype]]] = []
    if dtype is not None:
        seen: set[int] = set()
        for module in modules:
            if module is None:
                continue
            for sub in module.modules():
                if type(sub).forward is nn.Linear.forward and "forward" not in vars(sub):
                    if sub.weight.dtype == dtype or sub.weight.device.type == "meta":
                        continue
                    linears.append((sub, _dtypes(sub)))
                    sub.forward = _upcasting_linear(sub, dtype)
                    continue
                for t in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
                    if id(t) in seen or not t.is_floating_point() or t.dtype == dtype or t.device.type == "meta":
                        continue
                    seen.add(id(t))
                    changed.append((t, t.dtype))
                    t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t, old in changed:
            t.data = t.data.to(old)
        for linear, dtypes in linears:
            del linear.forward
            for name, old in dtypes.items():  # an algorithm may have replaced a tensor's data
                t = getattr(linear, name)
                if t is not None and t.dtype != old:
                    t.data = t.data.to(old)


def _dtypes(linear: nn.Linear) -> dict[str, torch.dtype]:
    return {name: t.dtype for name, t in (("weight", linear.weight), ("bias", linear.bias)) if t is not None}


#: the most bytes of a linear's weight cast at once by :func:`computing_in`
UPCAST_SLICE_BYTES = 16 * 2**20


def _upcasting_linear(linear: nn.Linear, dtype: torch.dtype):
    """``linear``'s forward in ``dtype``, its weight cast a slice at a time (an MLP weight of a 1B
    model is 46 MB in float32; slices keep the temporary copy small)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear_in(x.to(dtype), linear.weight, linear.bias, dtype, UPCAST_SLICE_BYTES)

    return forward


def linear_in(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, slice_bytes: int
) -> torch.Tensor:
    """``F.linear`` in ``dtype`` (``x`` already in it), the weight cast a slice of output rows at a
    time, each slice's copy within ``slice_bytes``."""
    rows = max(1, slice_bytes // (weight.shape[1] * torch.empty((), dtype=dtype).element_size()))
    if rows >= weight.shape[0]:
        return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
    parts = [
        F.linear(x, weight[i : i + rows].to(dtype), None if bias is None else bias[i : i + rows].to(dtype))
        for i in range(0, weight.shape[0], rows)
    ]
    return torch.cat(parts, -1)


def first_tensor(out: Any) -> torch.Tensor:
    """The hidden states from a block's return value (a tensor, or a tuple/ModelOutput led by one)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if hasattr(out, "to_tuple"):
        return first_tensor(out.to_tuple()[0])
    raise TypeError(f"cannot find hidden states in a block output of type {type(out).__name__}")
