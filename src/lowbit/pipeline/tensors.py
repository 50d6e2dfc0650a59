"""Moving nested call arguments (tensors inside tuples, lists, dicts) between devices."""

from __future__ import annotations

from typing import Any

import torch


def to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def first_tensor(out: Any) -> torch.Tensor:
    """The hidden states from a block's return value (a tensor, or a tuple/ModelOutput led by one)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if hasattr(out, "to_tuple"):
        return first_tensor(out.to_tuple()[0])
    raise TypeError(f"cannot find hidden states in a block output of type {type(out).__name__}")
