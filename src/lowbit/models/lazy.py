"""Models larger than memory: a weightless skeleton plus tensors read from safetensors on demand.

The skeleton's parameters live on the ``meta`` device (no memory); buffers computed at init
(rotary frequencies) are real. :meth:`LazyModel.materialize` reads one module's tensors from the
memory-mapped checkpoint shards, :meth:`LazyModel.release` gives the memory back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from pathlib import Path

import torch
from torch import nn

from .dtypes import compute_dtype
from .loading import ModelLoadError, model_kind

log = logging.getLogger(__name__)


class SafetensorsCheckpoint:
    """The tensors of a (possibly sharded) safetensors checkpoint, read lazily by name."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._headers: dict[str, tuple[dict, int]] = {}
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from None
            self.files = sorted(set(weight_map.values()))
            self.where = dict(weight_map)
        elif single.exists():
            self.files = [single.name]
            self.where = {}
        else:
            raise ModelLoadError(f"{self.path} has no model.safetensors or model.safetensors.index.json")
        for name in self.files:
            file = self.path / name
            if not file.exists():
                raise ModelLoadError(f"checkpoint shard {file} is missing")
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    keys = list(handle.keys())
            except Exception as exc:  # safetensors raises its own error type for corrupt headers
                raise ModelLoadError(f"checkpoint shard {file} is corrupt: {exc}") from None
            if len(self.files) == 1:
                self.where = dict.fromkeys(keys, name)

    @classmethod
    def single_file(cls, file: str | Path) -> SafetensorsCheckpoint:
        """One shard on its own (e.g. a block just written by a streaming run)."""
        file = Path(file)
        self = cls.__new__(cls)
        self.path = file.parent
        self._headers = {}
        self.files = [file.name]
        header, _ = self._header(file.name)
        self.where = {k: file.name for k in header if k != "__metadata__"}
        return self

    def keys(self) -> list[str]:
        return list(self.where)

    def dtype_of(self, name: str) -> torch.dtype:
        """A tensor's dtype, from its file's header (no data read)."""
        header, _ = self._header(self.where[name])
        return SAFETENSORS_DTYPES[header[name]["dtype"]]

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.where if k.startswith(prefix)]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors straight into private memory with plain file reads.

        Not through safetensors' memory map: mapped pages count towards the resident set until the
        map is closed, which doubled the peak while a large tensor (an embedding) was copied out.
        """
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.where:
                raise ModelLoadError(f"tensor {name} is not in the checkpoint {self.path}")
            by_file.setdefault(self.where[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            path = self.path / file
            header, data_start = self._header(file)
            with open(path, "rb", buffering=0) as f:
                for key in keys:
                    out[key] = _read_tensor(f, path, key, header.get(key), data_start)
        return out

    def mapped(self, name: str) -> torch.Tensor | None:
        """``name`` as a read-mostly view of its file (copy-on-write memory map): its pages are read
        from the page cache as they are touched, and count in the resident set only then. For an
        embedding table, of which a generation touches a few rows. ``None`` where the data is not
        aligned for its dtype."""
        import mmap

        file = self.where.get(name)
        if file is None:
            raise ModelLoadError(f"tensor {name} is not in the checkpoint {self.path}")
        header, data_start = self._header(file)
        entry = header[name]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = (int(o) for o in entry["data_offsets"])
        if (data_start + begin) % torch.empty((), dtype=dtype).element_size():
            return None
        with open(self.path / file, "rb") as f:
            memory = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if end > begin:
            flat = torch.frombuffer(memory, dtype=torch.uint8, count=end - begin, offset=data_start + begin)
        else:
            flat = torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape([int(d) for d in entry["shape"]])

    def _header(self, file: str) -> tuple[dict, int]:
        if file not in self._headers:
            path = self.path / file
            try:
                with open(path, "rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(length))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
                raise ModelLoadError(f"checkpoint shard {path} is corrupt: {exc}") from None
            self._headers[file] = (header, 8 + length)
        return self._headers[file]

    def fingerprint(self) -> dict[str, str]:
        """Per file: size and a hash of its header and first/last MiB (cheap, changes with content)."""
        out = {}
        for name in self.files:
            file = self.path / name
            h = hashlib.sha256()
            size = file.stat().st_size
            with open(file, "rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(size - (1 << 20))
                    h.update(f.read())
            out[name] = f"{size}:{h.hexdigest()[:16]}"
        config = self.path / "config.json"
        if config.exists():
            out["config.json"] = hashlib.sha256(config.read_bytes()).hexdigest()[:16]
        return out


SAFETENSORS_DTYPES = {  # safetensors dtype names
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _read_tensor(f, path: Path, key: str, entry: dict | None, data_start: int) -> torch.Tensor:
    """One tensor of an open safetensors file, read into a fresh buffer."""
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError(f"checkpoint shard {path} has an unreadable entry for {key}: {entry}") from None
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * itemsize:
        raise ModelLoadError(
            f"checkpoint shard {path}: {key} holds {end - begin} bytes, its shape needs {numel * itemsize}"
        )
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    f.seek(data_start + begin)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ModelLoadError(f"checkpoint shard {path} is truncated: {key} ends past the end of the file")
        done += n
    return buffer.view(dtype).reshape(shape)


class LazyModel:
    """A model skeleton whose weights are loaded module by module."""

    def __init__(self, path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        """``dtype``: what the skeleton computes in; by default the checkpoint's own dtype, or, given the
        ``device`` the blocks will run on, :func:`compute_dtype` of it."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        self.path = Path(path)
        self.checkpoint = SafetensorsCheckpoint(self.path)
        try:
            config = AutoConfig.from_pretrained(self.path)
        except Exception as exc:
            raise ModelLoadError(f"could not read the config of {self.path}: {exc}") from None
        self.kind = model_kind(config)
        cls = AutoModelForCausalLM if self.kind == "causal-lm" else AutoModel
        self.storage_dtype = _config_dtype(config)  # what the checkpoint holds (and the output keeps by default)
        if dtype is None:
            dtype = self.storage_dtype if device is None else compute_dtype(self.storage_dtype, device)
        self.dtype = dtype  # what the skeleton computes in
        with init_empty_weights(include_buffers=False):
            self.model: nn.Module = cls.from_config(config, dtype=self.dtype)
        self.model.eval()
        self._prefix = self._checkpoint_prefix()
        #: the checkpoint stores a tied head once, under the embeddings' name (even after untying)
        self.tied_head = bool(getattr(config, "tie_word_embeddings", False))
        self._renames: list[tuple[re.Pattern, str]] = []
        self._stored_as = _stored_names(self.model, self.checkpoint.keys())

    def _checkpoint_prefix(self) -> str:
        """Checkpoints of bare models (e.g. BertModel) may store names with or without a prefix."""
        names = [n for n, _ in self.model.named_parameters()]
        if not names or names[0] in self.checkpoint:
            return ""
        base = getattr(self.model, "base_model_prefix", "")
        if base and f"{base}.{names[0]}" in self.checkpoint:
            return base + "."
        return ""

    def checkpoint_name(self, name: str) -> str:
        renamed = name
        for pattern, replacement in self._renames:
            renamed = pattern.sub(replacement, renamed)
        key = self._prefix + renamed
        if key not in self.checkpoint and name in self._stored_as:
            return self._stored_as[name]
        return key

    def rename_in_blocks(self, blocks_path: str, model_prefix: str, checkpoint_prefix: str) -> None:
        """Map ``<block>.<model_prefix>.*`` to ``<block>.<checkpoint_prefix>.*`` (e.g. Mixtral's
        ``mlp`` is ``block_sparse_moe`` on disk)."""
        if model_prefix != checkpoint_prefix:
            pattern = re.compile(rf"^({re.escape(blocks_path)}\.\d+)\.{re.escape(model_prefix)}\.")
            self._renames.append((pattern, rf"\1.{checkpoint_prefix}."))

    @torch.no_grad()
    def materialize(
        self,
        module: nn.Module,
        prefix: str,
        source: SafetensorsCheckpoint | None = None,
        skip: set[str] = frozenset(),
    ) -> None:
        """Load the parameters of ``module`` (named ``prefix`` in the model) from disk (from
        ``source`` instead of the model's own checkpoint when given), except those named in ``skip``."""
        params = module.named_parameters(prefix=prefix)
        self._load({n: t for n, t in params if t.device.type == "meta" and n not in skip}, source)

    @torch.no_grad()
    def materialize_outside(self, blocks_path: str, skip: tuple[str, ...] = ()) -> None:
        """Load everything that is not inside the blocks (embeddings, final norm, head), except the
        modules named in ``skip``."""
        inside = blocks_path + "."
        skipped = tuple(f"{name}." for name in skip)
        self._load(
            {
                n: t
                for n, t in self.model.named_parameters()
                if not n.startswith(inside) and not n.startswith(skipped) and t.device.type == "meta"
            }
        )
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    def _load(self, params: dict[str, torch.Tensor], source: SafetensorsCheckpoint | None = None) -> None:
        from accelerate.utils import set_module_tensor_to_device

        checkpoint = source or self.checkpoint
        keys = {}
        for name in params:
            key = self.checkpoint_name(name)
            if key not in checkpoint:
                tied = self._tied_source(name)
                if tied is None:
                    raise ModelLoadError(f"tensor {key} is missing from the checkpoint {self.path}")
                key = self.checkpoint_name(tied)
            keys[name] = key
        values = checkpoint.get_many(list(set(keys.values())))
        for name, current in params.items():
            value = values[keys[name]]
            if tuple(value.shape) != tuple(current.shape):
                raise ModelLoadError(
                    f"tensor {keys[name]} has shape {tuple(value.shape)} in the checkpoint; the model expects {tuple(current.shape)}"
                )
            set_module_tensor_to_device(self.model, name, "cpu", value=value.to(current.dtype))

    def read(self, name: str) -> torch.Tensor:
        """Parameter ``name`` (a model name) as the checkpoint stores it (a tied head: the embeddings)."""
        key = self.checkpoint_name(name)
        if key not in self.checkpoint and (tied := self._tied_source(name)) is not None:
            key = self.checkpoint_name(tied)
        return self.checkpoint.get(key)

    def _tied_source(self, name: str) -> str | None:
        """The name of the input embedding when ``name`` is an output head tied to it."""
        if self.tied_head and name.endswith("lm_head.weight"):
            emb = self.model.get_input_embeddings()
            for n, m in self.model.named_modules():
                if m is emb:
                    return f"{n}.weight"
        return None

    @staticmethod
    def release(module: nn.Module) -> None:
        """Drop a module's parameters (back to the meta device). Buffers stay: they are small, and
        those computed at init (Gemma's embedding scale, rotary frequencies) are not in checkpoints."""
        buffers = [(sub, name, b) for sub in module.modules() for name, b in sub._buffers.items() if b is not None]
        module.to("meta")
        for sub, name, b in buffers:
            sub._buffers[name] = b


def _stored_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Model name -> checkpoint key, where transformers renames keys when it loads a checkpoint
    (GPT-NeoX stores its ``lm_head`` as ``embed_out``). Read from transformers' own conversion
    mapping (its plain renames; lowbit handles fused experts itself), applied to the checkpoint's
    keys, so that lowbit reads and writes the names a checkpoint of this family really has."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renames = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
    except Exception as exc:  # an older or newer transformers without this mapping: names as they are
        log.debug("no checkpoint renames from transformers: %s", exc)
        return {}
    stored = {}
    for key in keys:
        name = key
        for rename in renames:
            name, _ = rename.rename_source_key(name)
        if name != key:
            stored[name] = key
    return stored


def _config_dtype(config) -> torch.dtype:
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(name, torch.dtype):
        return name
    if isinstance(name, str) and hasattr(torch, name):
        return getattr(torch, name)
    return torch.float32
