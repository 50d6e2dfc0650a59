"""Moving nested call arguments (tensors inside tuples, lists, dicts) between devices and dtypes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn


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
    """Cast the floating-point parameters and buffers of ``modules`` to ``dtype`` for the duration,
    each back to its own dtype afterwards (a module may mix dtypes: fp32 norms in a bf16 model).
    The tensors stay the same objects, so hooks and references to them hold."""
    changed: list[tuple[torch.Tensor, torch.dtype]] = []
    if dtype is not None:
        seen: set[int] = set()
        for module in modules:
            if module is None:
                continue
            for t in [*module.parameters(), *module.buffers()]:
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


def first_tensor(out: Any) -> torch.Tensor:
    """The hidden states from a block's return value (a tensor, or a tuple/ModelOutput led by one)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if hasattr(out, "to_tuple"):
        return first_tensor(out.to_tuple()[0])
    raise TypeError(f"cannot find hidden states in a block output of type {type(out).__name__}")
