"""Writing a checkpoint shard by shard: one safetensors file per block, never the whole model at once."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ..models.lazy import SAFETENSORS_DTYPES

INDEX = "model.safetensors.index.json"


class ShardWriter:
    """Writes named tensor groups as ``model-<stem>.safetensors`` and keeps the index."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, stem: str, tensors: dict[str, torch.Tensor]) -> Path:
        """Write one shard atomically (temporary file, then rename)."""
        name = f"model-{stem}.safetensors"
        final = self.directory / name
        tmp = self.directory / (name + ".tmp")
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        write_safetensors(tmp, tensors, metadata={"format": "pt"})
        os.replace(tmp, final)
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()
        return final

    def adopt_existing(self) -> None:
        """Re-read the shards already on disk (when resuming a run)."""
        for file in sorted(self.directory.glob("model-*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    t = f.get_slice(key)
                    self.weight_map[key] = file.name
                    numel = 1
                    for d in t.get_shape():
                        numel *= d
                    self.total_size += numel * _dtype_size(t.get_dtype())

    def write_index(self) -> Path:
        path = self.directory / INDEX
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        path.write_text(json.dumps(index, indent=2) + "\n")
        return path


_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file straight from the tensors' memory, then fsync it.

    ``safetensors.torch.save_file`` first copies every tensor into one bytes object, which for a
    block of a 7B model is another 400 MB at the moment memory is tightest.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"cannot store {name} of dtype {t.dtype} in safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def _dtype_size(name: str) -> int:
    return torch.empty((), dtype=SAFETENSORS_DTYPES[name]).element_size()
