"""llama.cpp's block layouts: a :class:`QuantizedTensor` in a ggml format to and from ggml bytes.

The packing belongs with the formats (as :mod:`.packing` does for dense codes): a ggml type *is*
a lowbit format plus this byte layout. A GGUF writer needs per tensor only
``to_ggml_bytes(q)`` (``[rows, row_bytes]`` uint8, what ``GGUFWriter.add_tensor(name, data,
raw_dtype=...)`` takes) and ``ggml_quant_type(q.spec)``. Lossless: every value a ggml block can
hold is a value of the lowbit format and back, so ``from_ggml_bytes(to_ggml_bytes(q))`` returns
``q``'s codes and parameters exactly, and ggml decodes the bytes to ``Quantizer.dequantize(q)``
bit for bit. Layouts follow ggml-common.h; numpy only (gguf is needed only for the enum).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .ggml_types import GGML_TYPES, GGMLType
from .qtensor import QuantizedTensor
from .spec import INT_CODE_RANGE, FormatError, FormatSpec

__all__ = ["GGML_TYPES", "GGMLType", "from_ggml_bytes", "ggml_quant_type", "ggml_type", "to_ggml_bytes"]


def ggml_type(fmt: FormatSpec | GGMLType | str | int | Any) -> GGMLType:
    """The ggml type of a lowbit spec, or given by name (``"Q4_K"``/``"q4_k"``), id or gguf enum."""
    if isinstance(fmt, GGMLType):
        return fmt
    if isinstance(fmt, FormatSpec):
        if fmt.ggml_type is None:
            raise FormatError(f"{fmt.label()} is not one of llama.cpp's block formats ({', '.join(GGML_TYPES)})")
        return GGML_TYPES[fmt.ggml_type]
    if isinstance(fmt, str):
        if fmt.lower() in GGML_TYPES:
            return GGML_TYPES[fmt.lower()]
        raise FormatError(f"unknown ggml type {fmt!r}; lowbit packs {', '.join(GGML_TYPES)}")
    by_id = {t.type_id: t for t in GGML_TYPES.values()}
    if int(fmt) not in by_id:
        raise FormatError(f"ggml type id {int(fmt)} is not one lowbit packs ({', '.join(GGML_TYPES)})")
    return by_id[int(fmt)]


def ggml_quant_type(fmt: FormatSpec | GGMLType | str | int):
    """``gguf.GGMLQuantizationType`` of a format (for ``GGUFWriter.add_tensor(raw_dtype=...)``)."""
    import gguf

    return gguf.GGMLQuantizationType(ggml_type(fmt).type_id)


# ----------------------------------------------------------------------------- to bytes
def to_ggml_bytes(q: QuantizedTensor) -> np.ndarray:
    """The ggml blocks of ``q``: uint8 ``[rows, cols / block * block_bytes]`` (rows: all but the
    last dimension of ``q.shape``)."""
    t = ggml_type(q.spec)
    if q.g_idx is not None:
        raise FormatError(
            "ggml blocks are contiguous columns, but this tensor's groups follow act-order (g_idx): "
            "quantize with static groups (GPTQ static_groups=True) for llama.cpp"
        )
    cols = q.shape[-1] if q.shape else 1
    rows = math.prod(q.shape) // cols
    if cols % t.block:
        raise FormatError(f"{t.name}: shape {tuple(q.shape)} has rows of {cols}, not a multiple of {t.block}")
    n = rows * cols // t.block
    codes = q.codes.reshape(n, t.block).cpu().numpy().astype(np.int64)
    if codes.min(initial=0) < 0 or codes.max(initial=0) > (1 << q.spec.bits) - 1:
        raise FormatError(f"{t.name}: codes outside [0, {(1 << q.spec.bits) - 1}]")
    f = _fields(q, t, n)
    out = _PACK[t.name](codes, f)
    assert out.shape == (n, t.block_bytes)
    return out.reshape(rows, cols // t.block * t.block_bytes)


def _fields(q: QuantizedTensor, t: GGMLType, n: int) -> dict[str, np.ndarray]:
    """The stored parameters per block, checked to be exactly what ggml can hold."""
    s = q.spec
    if s.super_block is None:
        out = {"d": _fp16(q.scale, "scale", n)}
        if s.zero_style == "min":
            out["m"] = _fp16(-q.zero, "min", n)  # ggml adds its m: ours is subtracted
        return out
    k = s.super_block // s.group_size
    out = {"d": _fp16(q.super_scale, "super_scale", n), "sc": _ints(q.scale, s.scale_dtype, "scale", n, k)}
    if s.super_min:
        out["dmin"] = _fp16(q.super_min, "super_min", n)
        out["m"] = _ints(q.zero, s.zero_dtype, "min", n, k)
    return out


def _fp16(t: torch.Tensor, what: str, n: int) -> np.ndarray:
    v = t.detach().float().cpu().numpy().reshape(n)
    h = v.astype(np.float16)
    if not np.array_equal(h.astype(np.float32), v, equal_nan=True):
        raise FormatError(f"{what}: values that are not fp16 numbers cannot be stored in ggml blocks")
    return h.view(np.uint8).reshape(n, 2)


def _ints(t: torch.Tensor, dtype: str, what: str, n: int, k: int) -> np.ndarray:
    v = t.detach().float().cpu().numpy().reshape(n, k)
    lo, hi = INT_CODE_RANGE[dtype]
    if not (np.array_equal(v, np.round(v)) and v.min() >= lo and v.max() <= hi):
        raise FormatError(f"{what}: ggml stores integers in [{lo}, {hi}] ({dtype}) here")
    return v.astype(np.int64)


def _u8(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate([p.astype(np.uint8) for p in parts], axis=-1)


def _halves4(q: np.ndarray) -> np.ndarray:
    """Legacy nibbles: byte j holds element j (low) and element j + 16 (high)."""
    return (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)


def _bit5(q: np.ndarray) -> np.ndarray:
    """Legacy qh: bit e of a little-endian uint32 is bit 4 of element e."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=-1, bitorder="little")


def _planes2(q: np.ndarray) -> np.ndarray:
    """K-quant 2-bit planes: element 128h + 32s + l in byte 32h + l, bits 2s..2s+1."""
    c = (q & 3).reshape(-1, 2, 4, 32) << (2 * np.arange(4)).reshape(1, 1, 4, 1)
    return c.sum(2).reshape(-1, 64)


def _high_bits(q: np.ndarray, shift: int) -> np.ndarray:
    """K-quant high-bit mask: bit ``shift`` of element e in byte e % 32, bit e // 32."""
    c = ((q >> shift) & 1).reshape(-1, 8, 32) << np.arange(8).reshape(1, 8, 1)
    return c.sum(1)


def _nibbles64(q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: element 64c + l in the low nibble of byte 32c + l, 64c + 32 + l in the high one."""
    c = (q & 15).reshape(-1, 4, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128)


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins (ggml's get_scale_min_k4, inverted)."""
    return np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            m[:, :4] | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
        ],
        axis=1,
    )


def _scales_q3(u: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes of sixteen 6-bit values: low nibbles in bytes 0..7, top 2 bits in 8..11."""
    low = (u[:, :8] & 15) | ((u[:, 8:] & 15) << 4)
    high = ((u >> 4) & 3).reshape(-1, 4, 4) << (2 * np.arange(4)).reshape(1, 4, 1)
    return np.concatenate([low, high.sum(1)], axis=1)


def _q6_low(q: np.ndarray) -> np.ndarray:
    c = (q & 15).reshape(-1, 2, 4, 32)
    return np.stack([c[:, :, 0] | (c[:, :, 2] << 4), c[:, :, 1] | (c[:, :, 3] << 4)], axis=2).reshape(-1, 128)


def _q6_high(q: np.ndarray) -> np.ndarray:
    c = (q >> 4).reshape(-1, 2, 4, 32) << (2 * np.arange(4)).reshape(1, 1, 4, 1)
    return c.sum(2).reshape(-1, 64)


_PACK = {
    "q8_0": lambda q, f: _u8(f["d"], q ^ 0x80),  # signed int8 = code - 128
    "q4_0": lambda q, f: _u8(f["d"], _halves4(q)),
    "q4_1": lambda q, f: _u8(f["d"], f["m"], _halves4(q)),
    "q5_0": lambda q, f: _u8(f["d"], _bit5(q), _halves4(q)),
    "q5_1": lambda q, f: _u8(f["d"], f["m"], _bit5(q), _halves4(q)),
    "q2_k": lambda q, f: _u8(f["sc"] | (f["m"] << 4), _planes2(q), f["d"], f["dmin"]),
    "q3_k": lambda q, f: _u8(_high_bits(q, 2), _planes2(q), _scales_q3(f["sc"] + 32), f["d"]),
    "q4_k": lambda q, f: _u8(f["d"], f["dmin"], _scales_k4(f["sc"], f["m"]), _nibbles64(q)),
    "q5_k": lambda q, f: _u8(f["d"], f["dmin"], _scales_k4(f["sc"], f["m"]), _high_bits(q, 4), _nibbles64(q)),
    "q6_k": lambda q, f: _u8(_q6_low(q), _q6_high(q), f["sc"] & 0xFF, f["d"]),
}


# ----------------------------------------------------------------------------- from bytes
def from_ggml_bytes(data: np.ndarray | bytes, type: Any, shape: tuple[int, ...]) -> QuantizedTensor:
    """A :class:`QuantizedTensor` (codes and parameters exactly as stored) from ggml blocks of
    ``type`` (name, id, gguf enum or :class:`GGMLType`) holding a tensor of ``shape`` (numpy order)."""
    from .presets import make_format

    t = ggml_type(type)
    shape = tuple(int(d) for d in shape)
    cols = shape[-1] if shape else 1
    rows = math.prod(shape) // cols
    if cols % t.block:
        raise FormatError(f"{t.name}: shape {shape} has rows of {cols}, not a multiple of {t.block}")
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else np.asarray(data)
    n = rows * cols // t.block
    if raw.dtype != np.uint8 or raw.size != n * t.block_bytes:
        raise FormatError(
            f"{t.name}: shape {shape} needs {n * t.block_bytes} bytes of uint8, got {raw.size} {raw.dtype}"
        )
    codes, f = _UNPACK[t.name](raw.reshape(n, t.block_bytes))
    spec = make_format(t.name)
    groups = cols // spec.group_size

    def per(a: np.ndarray | None, width: int) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(rows, width)

    blocks = cols // t.block
    if spec.super_block is None:
        scale, zero, sup, supmin = f["d"], None if "m" not in f else -f["m"], None, None
    else:
        scale, zero, sup, supmin = f["sc"], f.get("m"), f["d"], f.get("dmin")
    return QuantizedTensor(
        codes=torch.from_numpy(codes.astype(np.uint8)).reshape(rows, cols),
        scale=per(scale, groups),
        zero=per(zero, groups),
        global_scale=None,
        spec=spec,
        shape=shape,
        super_scale=per(sup, blocks),
        super_min=per(supmin, blocks),
    )


def _h(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[:, 0]


def _from_halves4(b: np.ndarray) -> np.ndarray:
    b = b.astype(np.int64)
    return np.concatenate([b & 15, b >> 4], axis=1)


def _from_bit5(b: np.ndarray) -> np.ndarray:
    return np.unpackbits(b, axis=-1, bitorder="little").astype(np.int64) << 4


def _from_planes2(b: np.ndarray) -> np.ndarray:
    b = b.astype(np.int64).reshape(-1, 2, 1, 32)
    return ((b >> (2 * np.arange(4)).reshape(1, 1, 4, 1)) & 3).reshape(-1, 256)


def _from_high_bits(b: np.ndarray, shift: int) -> np.ndarray:
    b = b.astype(np.int64).reshape(-1, 1, 32)
    return (((b >> np.arange(8).reshape(1, 8, 1)) & 1) << shift).reshape(-1, 256)


def _from_nibbles64(b: np.ndarray) -> np.ndarray:
    b = b.astype(np.int64).reshape(-1, 4, 1, 32)
    return np.concatenate([b & 15, b >> 4], axis=2).reshape(-1, 256)


def _from_scales_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = b.astype(np.int64)
    d, m, low = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([d & 63, (low & 15) | ((d >> 6) << 4)], axis=1)
    mn = np.concatenate([m & 63, (low >> 4) | ((m >> 6) << 4)], axis=1)
    return sc, mn


def _from_scales_q3(b: np.ndarray) -> np.ndarray:
    b = b.astype(np.int64)
    low = np.concatenate([b[:, :8] & 15, b[:, :8] >> 4], axis=1)
    high = (b[:, 8:12].reshape(-1, 1, 4) >> (2 * np.arange(4)).reshape(1, 4, 1)) & 3
    return low | (high.reshape(-1, 16) << 4)


def _from_q6(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    ql = ql.astype(np.int64).reshape(-1, 2, 2, 32)
    low = np.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    high = (qh.astype(np.int64).reshape(-1, 2, 1, 32) >> (2 * np.arange(4)).reshape(1, 1, 4, 1)) & 3
    return (low | (high << 4)).reshape(-1, 256)


def _unpack_q2_k(b: np.ndarray):
    s = b[:, :16].astype(np.int64)
    return _from_planes2(b[:, 16:80]), {"sc": s & 15, "m": s >> 4, "d": _h(b[:, 80:82]), "dmin": _h(b[:, 82:84])}


def _unpack_q3_k(b: np.ndarray):
    codes = _from_planes2(b[:, 32:96]) | _from_high_bits(b[:, :32], 2)
    return codes, {"sc": _from_scales_q3(b[:, 96:108]) - 32, "d": _h(b[:, 108:110])}


def _unpack_q45_k(b: np.ndarray, five: bool):
    sc, mn = _from_scales_k4(b[:, 4:16])
    codes = _from_nibbles64(b[:, 48:176] if five else b[:, 16:144])
    if five:
        codes = codes | _from_high_bits(b[:, 16:48], 4)
    return codes, {"sc": sc, "m": mn, "d": _h(b[:, 0:2]), "dmin": _h(b[:, 2:4])}


_UNPACK = {
    "q8_0": lambda b: (b[:, 2:].astype(np.int64) ^ 0x80, {"d": _h(b[:, :2])}),
    "q4_0": lambda b: (_from_halves4(b[:, 2:]), {"d": _h(b[:, :2])}),
    "q4_1": lambda b: (_from_halves4(b[:, 4:]), {"d": _h(b[:, :2]), "m": _h(b[:, 2:4])}),
    "q5_0": lambda b: (_from_halves4(b[:, 6:]) | _from_bit5(b[:, 2:6]), {"d": _h(b[:, :2])}),
    "q5_1": lambda b: (_from_halves4(b[:, 8:]) | _from_bit5(b[:, 4:8]), {"d": _h(b[:, :2]), "m": _h(b[:, 2:4])}),
    "q2_k": _unpack_q2_k,
    "q3_k": _unpack_q3_k,
    "q4_k": lambda b: _unpack_q45_k(b, five=False),
    "q5_k": lambda b: _unpack_q45_k(b, five=True),
    "q6_k": lambda b: (
        _from_q6(b[:, :128], b[:, 128:192]),
        {"sc": b[:, 192:208].view(np.int8), "d": _h(b[:, 208:210])},
    ),
}
