"""A quantized KV cache for transformers' ``generate()`` (KIVI-style, with attention sinks).

Keys are quantized per channel (one scale and zero-point per channel over a group of ``group_size``
consecutive tokens: key outliers sit in fixed channels), values per token (one scale and zero-point per
``value_group_size`` elements of a token), as KIVI (Liu et al., 2024) does. The most recent tokens
stay in full precision until a whole group of them is older than the ``residual`` window; the first
``sinks`` tokens (attention sinks) are never quantized. Quantized groups are stored packed (codes,
fp16 scales and zero-points), so the cache really is smaller; every attention call dequantizes them.

In a single forward pass over a sequence (perplexity evaluation), every token outside the sinks and
the last ``residual`` positions reaches every query quantized: stricter than generation, where each
new token still sees its own recent window in full precision.

Keys are quantized after the rotary embedding (what the cache holds); KVQuant's pre-RoPE keys are
not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers.cache_utils import Cache, DynamicLayer

from ..formats import FormatSpec, Quantizer, make_format, pack, unpack
from ..formats.qtensor import QuantizedTensor


class KVCacheScheme(BaseModel):
    """How the KV cache is quantized.

    Attributes:
        bits: 2, 3, 4 or 8 (asymmetric integers), or ``fp8`` (E4M3 with one fp16 scale per group).
        group_size: tokens per key group (each channel gets one scale over them); also how many
            tokens are quantized at a time.
        value_group_size: elements of a token's value vector per scale (``-1``: the whole head).
        residual: recent tokens kept in full precision.
        sinks: first tokens never quantized.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int | Literal["fp8"] = 4
    group_size: int = Field(32, ge=1)
    value_group_size: int = Field(-1, ge=-1)
    residual: int = Field(32, ge=0)
    sinks: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> KVCacheScheme:
        if self.bits != "fp8" and self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4, 8 or 'fp8', got {self.bits!r}")
        if self.value_group_size == 0:
            raise ValueError("value_group_size must be positive or -1")
        return self

    @property
    def row_format(self) -> FormatSpec:
        """The format of a quantized row: one fp16 scale (and for integers one fp16 zero-point) per row,
        as the cache stores them."""
        if self.bits == "fp8":
            return make_format("fp8", group_size=-1, scale_dtype="float16")
        return make_format("int", bits=self.bits, group_size=-1, symmetric=False, zero_dtype="float16")

    @property
    def element_bits(self) -> int:
        return 8 if self.bits == "fp8" else int(self.bits)

    def bytes_per_token(self, layers: int, kv_heads: int, head_dim: int) -> float:
        """Cache bytes per token in steady state (quantized groups; fp16 scales and zero-points)."""
        params = 2 if self.bits != "fp8" else 1  # scale (+ zero-point), fp16 each
        vgroup = head_dim if self.value_group_size == -1 else self.value_group_size
        keys = kv_heads * head_dim * (self.element_bits / 8 + 2 * params / self.group_size)
        values = kv_heads * head_dim * self.element_bits / 8 + kv_heads * (head_dim // vgroup) * 2 * params
        return layers * (keys + values)


@dataclass
class _Group:
    """One quantized group of tokens: packed codes ``[rows, words]`` and the fp16 scale (and zero-point)
    of each row; ``shape`` is the group's ``[B, H, G, D]``."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: FormatSpec
    row_length: int
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        tensors = [self.packed, self.scale] + ([] if self.zero is None else [self.zero])
        return sum(t.numel() * t.element_size() for t in tensors)


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache: sinks and the recent tail in full precision, the rest packed."""

    def __init__(self, scheme: KVCacheScheme):
        super().__init__()
        self.scheme = scheme
        self.length = 0
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self._key_groups: list[_Group] = []
        self._value_groups: list[_Group] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        have = 0 if self.sink_keys is None else self.sink_keys.shape[-2]
        if have < self.scheme.sinks:  # the first tokens become sinks, never quantized
            take = min(self.scheme.sinks - have, keys.shape[-2])
            new_k, new_v = keys[..., :take, :], values[..., :take, :]
            self.sink_keys = new_k if self.sink_keys is None else torch.cat([self.sink_keys, new_k], dim=-2)
            self.sink_values = new_v if self.sink_values is None else torch.cat([self.sink_values, new_v], dim=-2)
            keys, values = keys[..., take:, :], values[..., take:, :]
        g = self.scheme.group_size
        while keys.shape[-2] - self.scheme.residual >= g:  # a whole group has left the window
            self._key_groups.append(self._quantize_keys(keys[..., :g, :]))
            self._value_groups.append(self._quantize_values(values[..., :g, :]))
            keys, values = keys[..., g:, :], values[..., g:, :]
        self.keys, self.values = keys.contiguous(), values.contiguous()
        return self._all(key_states.dtype)

    def _all(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        parts_k = [] if self.sink_keys is None else [self.sink_keys]
        parts_v = [] if self.sink_values is None else [self.sink_values]
        parts_k += [self._dequantize_keys(group).to(dtype) for group in self._key_groups]
        parts_v += [self._dequantize_values(group).to(dtype) for group in self._value_groups]
        return torch.cat([*parts_k, self.keys], dim=-2), torch.cat([*parts_v, self.values], dim=-2)

    # keys: [B, H, G, D] -> rows are (b, h, d) over the G tokens of the group
    def _quantize_keys(self, k: torch.Tensor) -> _Group:
        return self._quantize(k.float().permute(0, 1, 3, 2).reshape(-1, k.shape[-2]), k.shape)

    def _dequantize_keys(self, group: _Group) -> torch.Tensor:
        b, h, g, d = group.shape
        return self._dequantize(group).reshape(b, h, d, g).permute(0, 1, 3, 2)

    # values: [B, H, G, D] -> rows are (b, h, token, value group)
    def _quantize_values(self, v: torch.Tensor) -> _Group:
        d = v.shape[-1]
        size = d if self.scheme.value_group_size == -1 else self.scheme.value_group_size
        if d % size:
            raise ValueError(f"value_group_size {size} does not divide the head dimension {d}")
        return self._quantize(v.float().reshape(-1, size), v.shape)

    def _dequantize_values(self, group: _Group) -> torch.Tensor:
        return self._dequantize(group).reshape(group.shape)

    def _quantize(self, rows: torch.Tensor, shape: torch.Size) -> _Group:
        q = Quantizer(self.scheme.row_format).quantize(rows)  # fp16 parameters: stored as they were used
        zero = None if q.zero is None else q.zero.to(torch.float16)
        packed = pack(q.codes, q.spec.bits, torch.int32)
        return _Group(packed, q.scale.to(torch.float16), zero, q.spec, rows.shape[1], tuple(shape))

    @staticmethod
    def _dequantize(group: _Group) -> torch.Tensor:
        rows, n = group.packed.shape[0], group.row_length
        codes = unpack(group.packed, group.spec.bits, n, torch.int32)
        zero = None if group.zero is None else group.zero.float()
        q = QuantizedTensor(codes, group.scale.float(), zero, None, group.spec, (rows, n))
        return Quantizer(group.spec).dequantize(q)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def nbytes(self) -> int:
        """Bytes this layer holds: packed codes, scales and zero-points, and full-precision tokens."""
        dense = [t for t in (self.keys, self.values, self.sink_keys, self.sink_values) if t is not None]
        return sum(t.numel() * t.element_size() for t in dense) + sum(
            g.nbytes() for g in [*self._key_groups, *self._value_groups]
        )

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (assisted decoding needs a DynamicCache)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search with a quantized KV cache is not supported")


def cache_dims(config) -> tuple[int, int, int]:
    """``(layers, KV heads, head dimension)`` of a transformers model config: what a KV cache holds
    per token."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def fp16_bytes_per_token(layers: int, kv_heads: int, head_dim: int) -> int:
    """Bytes per token of an unquantized fp16 cache (keys and values, all layers)."""
    return layers * 2 * kv_heads * head_dim * 2


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` whose layers quantize keys and values as ``scheme`` says.

    >>> cache = QuantizedKVCache(KVCacheScheme(bits=4))
    >>> model.generate(ids, past_key_values=cache, max_new_tokens=32)  # doctest: +SKIP
    """

    def __init__(self, scheme: KVCacheScheme | None = None, **kwargs):
        self.scheme = scheme or KVCacheScheme(**kwargs)
        super().__init__(layers=[])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(QuantizedKVLayer(self.scheme))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
