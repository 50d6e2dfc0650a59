"""Writing a checkpoint shard by shard: one safetensors file per block, never the whole model at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
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


def _dtype_size(name: str) -> int:
    return {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(
        name, 4
    )
