"""ggml block packing against independent references: gguf-py's decoder and legacy encoders, and
(optional) llama.cpp's C reference encoders through ctypes."""

import ctypes
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import FormatError, Quantizer, from_ggml_bytes, ggml_quant_type, make_format, to_ggml_bytes
from lowbit.formats.ggml_types import GGML_TYPES
from tests.formats.test_ggml_formats import weights

gguf = pytest.importorskip("gguf")

NAMES = list(GGML_TYPES)
LEGACY = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]  # the types gguf-py can quantize


def gguf_type(name: str):
    return gguf.GGMLQuantizationType[name.upper()]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def assert_same_qtensor(a, b) -> None:
    assert a.shape == b.shape and a.spec.ggml_type == b.spec.ggml_type
    for field in ("codes", "scale", "zero", "super_scale", "super_min"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:  # bit for bit, signed zeros included
            assert torch.equal(x.float().view(torch.int32), y.float().view(torch.int32)), field


def test_type_ids_sizes_and_names_are_ggmls():
    for name, t in GGML_TYPES.items():
        assert int(gguf_type(name)) == t.type_id
        assert gguf.GGML_QUANT_SIZES[gguf_type(name)] == (t.block, t.block_bytes)
        assert ggml_quant_type(make_format(name)) == gguf_type(name)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("clip", ["minmax", "mse", "llama.cpp"])
def test_ggml_decodes_the_packed_blocks_to_lowbits_values_bit_for_bit(name, clip):
    q = Quantizer(make_format(name, clip=clip, clip_grid=5))
    for seed, scale in [(0, 1.0), (1, 1e-3), (2, 40.0)]:
        w = weights(seed, rows=8, cols=768, scale=scale)
        qt = q.quantize(w)
        data = to_ggml_bytes(qt)
        assert data.dtype == np.uint8 and data.shape == (
            8,
            768 // GGML_TYPES[name].block * GGML_TYPES[name].block_bytes,
        )
        assert data.nbytes * 8 == q.exact_bits(w.shape)  # the storage lowbit counts is the storage ggml uses
        assert same_bits(gguf.quants.dequantize(data, gguf_type(name)), q.dequantize(qt).numpy())
        assert_same_qtensor(from_ggml_bytes(data, name, tuple(w.shape)), qt)


@pytest.mark.parametrize("name", LEGACY)
def test_llama_cpp_rule_reproduces_gguf_quantize(name):
    q = Quantizer(make_format(name, clip="llama.cpp"))
    for seed, scale in [(0, 1.0), (1, 1e-3), (2, 40.0), (3, 1e3)]:
        w = weights(seed, rows=16, cols=512, scale=scale)  # zeros are +0.0: see test below for -0.0
        assert np.array_equal(to_ggml_bytes(q.quantize(w)), gguf.quants.quantize(w.numpy(), gguf_type(name)))


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), seed=st.integers(0, 2**32 - 1))
def test_every_ggml_block_is_a_lowbit_tensor_and_back(name, seed):
    """Random bytes (finite fp16 fields of any sign and size, every integer field at random): lowbit
    holds them (representable set >= ggml's), decodes them as ggml does, and packs them back."""
    t = GGML_TYPES[name]
    rng = np.random.default_rng(seed)
    rows, blocks = 3, 2
    raw = rng.integers(0, 256, size=(rows * blocks, t.block_bytes), dtype=np.uint8)
    for offset in _fp16_offsets(name):
        values = rng.choice([-1.0, 1.0], rows * blocks) * 2.0 ** rng.uniform(-24, 15, rows * blocks)
        values[rng.random(rows * blocks) < 0.2] = 0.0
        raw[:, offset : offset + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)
    data = raw.reshape(rows, blocks * t.block_bytes)
    qt = from_ggml_bytes(data, name, (rows, blocks * t.block))
    assert np.array_equal(to_ggml_bytes(qt), data)
    expected = gguf.quants.dequantize(data, gguf_type(name))
    assert same_bits(expected, Quantizer(qt.spec).dequantize(qt).numpy())


def _fp16_offsets(name: str) -> list[int]:
    return {
        "q8_0": [0],
        "q4_0": [0],
        "q5_0": [0],
        "q4_1": [0, 2],
        "q5_1": [0, 2],
        "q2_k": [80, 82],
        "q3_k": [108],
        "q4_k": [0, 2],
        "q5_k": [0, 2],
        "q6_k": [208],
    }[name]


def test_packing_refuses_what_ggml_cannot_hold():
    q = Quantizer(make_format("q4_k"))
    qt = q.quantize(weights(0))
    with pytest.raises(FormatError, match="super_scale: values that are not fp16"):
        to_ggml_bytes(type(qt)(**{**qt.__dict__, "super_scale": qt.super_scale + 1e-5}))
    with pytest.raises(FormatError, match=r"scale: ggml stores integers in \[0, 63\]"):
        to_ggml_bytes(type(qt)(**{**qt.__dict__, "scale": qt.scale * 2}))
    shuffled = type(qt)(**{**qt.__dict__, "g_idx": torch.arange(512, dtype=torch.int32) // 32})
    with pytest.raises(FormatError, match="static_groups=True"):
        to_ggml_bytes(shuffled)
    with pytest.raises(FormatError, match="not one of llama.cpp's block formats"):
        to_ggml_bytes(Quantizer(make_format("int4")).quantize(weights(0)))
    with pytest.raises(FormatError, match="needs 576 bytes"):
        from_ggml_bytes(np.zeros(100, np.uint8), "Q4_K", (2, 512))
    assert from_ggml_bytes(bytes(144), int(gguf_type("q4_k")), (1, 256)).spec.ggml_type == "q4_k"


def test_negative_zero_follows_cs_reference_not_numpys():
    """An all-zero Q4_0 block holding -0.0: C's ref keeps max = +0.0 (d = -0.0); gguf-py takes the
    first element (d = +0.0). Both decode to zeros; lowbit writes C's bytes."""
    w = torch.zeros(1, 32)
    w[0, 0] = -0.0
    data = to_ggml_bytes(Quantizer(make_format("q4_0", clip="llama.cpp")).quantize(w))
    assert data[0, :2].view(np.float16)[0] == 0 and np.signbit(data[0, :2].view(np.float16)[0])


# ----------------------------------------------------------------------------- llama.cpp's C encoders
@pytest.fixture(scope="module")
def libggml():
    path = os.environ.get("LOWBIT_GGML_LIB")
    if not path or not os.path.exists(path):
        pytest.skip("set LOWBIT_GGML_LIB to llama.cpp's libggml-base.so to compare with its C encoders")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def c_reference(lib, x: np.ndarray, name: str) -> np.ndarray:
    """``ggml_quantize_chunk`` without an importance matrix: the ``quantize_row_*_ref`` encoders."""
    t = GGML_TYPES[name]
    lib.ggml_quantize_init(t.type_id)
    out = np.zeros((x.shape[0], x.shape[1] // t.block * t.block_bytes), np.uint8)
    written = lib.ggml_quantize_chunk(t.type_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert written == out.nbytes
    return out


def _distributions(rng):
    yield rng.standard_normal((16, 512))
    yield rng.standard_normal((16, 512)) * 1e-6
    yield np.abs(rng.standard_normal((16, 512)))
    yield -np.abs(rng.standard_normal((16, 512))) - 1
    yield rng.standard_t(1.5, (16, 512))
    yield rng.integers(-3, 4, (16, 512)).astype(float)
    yield rng.standard_normal((16, 512)) * (rng.random((16, 512)) < 0.05)  # sparse, with -0.0
    yield np.repeat(rng.standard_normal((16, 16)), 32, axis=1)
    yield weights(0, rows=16).numpy()


@pytest.mark.optional
@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_rule_writes_the_c_reference_bytes(libggml, name):
    q = Quantizer(make_format(name, clip="llama.cpp"))
    for x in _distributions(np.random.default_rng(7)):
        x = np.ascontiguousarray(x, dtype=np.float32)
        assert np.array_equal(to_ggml_bytes(q.quantize(torch.from_numpy(x))), c_reference(libggml, x, name))
