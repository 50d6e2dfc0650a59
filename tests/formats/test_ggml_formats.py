"""llama.cpp's block formats as lowbit formats: grids, storage, shapes, parameter rules.

The byte-level checks against gguf's decoder and llama.cpp's encoders are in test_ggml_packing.py.
"""

import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import FormatError, Quantizer, make_format
from lowbit.formats.ggml_types import GGML_TYPES

NAMES = list(GGML_TYPES)
K_QUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]

# bits per weight from llama.cpp's block sizes (ggml-common.h): 8 * bytes / elements
BPW = {
    "q8_0": 8.5,
    "q4_0": 4.5,
    "q4_1": 5.0,
    "q5_0": 5.5,
    "q5_1": 6.0,
    "q2_k": 2.625,
    "q3_k": 3.4375,
    "q4_k": 4.5,
    "q5_k": 5.5,
    "q6_k": 6.5625,
}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}
BLOCK_BYTES.update({"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210})


def weights(seed: int, rows: int = 8, cols: int = 512, scale: float = 1.0) -> torch.Tensor:
    """Gaussian weights with the cases blocks must survive: outliers, zeros, constant runs, an
    all-zero block, an all-positive and an all-negative block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    w[0, :256] = 0.0
    w[1, 32:64] = 0.75 * scale
    w[2, 5] = 60.0 * scale
    w[3, ::7] = 0.0
    w[4, :256] = w[4, :256].abs() + scale
    w[5, 256:] = -w[5, 256:].abs()
    return w


def grid_values(q: Quantizer, qt) -> torch.Tensor:
    """Every value each element's group can take: ``[rows, cols, 2**bits]``, decoded from the
    stored parameters by ggml's formulas written out here (not through ``Quantizer.decode``)."""
    gs = q.spec.group_size
    per_col = {k: v.repeat_interleave(gs, dim=1)[..., None] for k, v in _effective(qt).items()}
    codes = torch.arange(1 << q.spec.bits, dtype=torch.float32)
    if q.spec.zero_style == "min":
        return codes * per_col["scale"] - per_col["min"]
    return (codes - (1 << (q.spec.bits - 1))) * per_col["scale"]


def _effective(qt) -> dict[str, torch.Tensor]:
    k = qt.scale.shape[1] // (1 if qt.super_scale is None else qt.super_scale.shape[1])
    scale = qt.scale if qt.super_scale is None else qt.scale * qt.super_scale.repeat_interleave(k, dim=1)
    out = {"scale": scale}
    if qt.zero is not None:
        out["min"] = qt.zero if qt.super_min is None else qt.zero * qt.super_min.repeat_interleave(k, dim=1)
    return out


# ----------------------------------------------------------------------------- storage
@pytest.mark.parametrize("name", NAMES)
def test_bits_per_weight_are_llama_cpps_block_sizes(name):
    q = Quantizer(make_format(name))
    block = 256 if name.endswith("_k") else 32
    assert Fraction(8 * BLOCK_BYTES[name], block) == BPW[name]
    assert q.bits_per_weight((64, 512)) == BPW[name]
    assert q.exact_bits((3, 768)) == 3 * 768 // block * BLOCK_BYTES[name] * 8


@pytest.mark.parametrize("name", NAMES)
def test_presets_are_the_ggml_grids_and_fix_their_structure(name):
    spec = make_format(name)
    assert spec.ggml_type == name and spec.label() == name
    assert make_format(name, clip="llama.cpp").label() == f"{name}-llama.cpp"
    with pytest.raises(ValueError, match=f"{name} is defined with group_size"):
        make_format(name, group_size=128)
    with pytest.raises(ValueError, match=f"{name} is defined with bits"):
        make_format(name, bits=7)


def test_the_legacy_symmetric_types_are_lowbits_integer_formats():
    # Q4_0 stores nibbles meaning q - 8, Q5_0 q - 16, Q8_0 a signed int8: lowbit's symmetric grids
    assert make_format("int4", group_size=32).ggml_type == "q4_0"
    assert make_format("int5", group_size=32).ggml_type == "q5_0"
    assert make_format("int8", group_size=32).ggml_type == "q8_0"
    assert make_format("int4", group_size=32, symmetric=False).ggml_type is None  # zero-points in code units
    assert make_format("int4", group_size=32, symmetric=False, zero_style="min").ggml_type == "q4_1"
    assert make_format("int4", group_size=64).ggml_type is None


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"clip": "llama.cpp"}, "clip='llama.cpp' needs one of llama.cpp's block formats"),
        ({"zero_style": "min"}, "zero_style='min'.*symmetric=False"),
        ({"scale_dtype": "uint6"}, "needs super_block"),
        ({"super_block": 256}, "super_block needs integer scales"),
        ({"super_block": 100, "scale_dtype": "uint6", "group_size": 32}, "multiple of group_size"),
        ({"symmetric": False, "zero_dtype": "uint6", "super_block": 256, "scale_dtype": "uint6"}, "zero_style='min'"),
    ],
)
def test_bad_block_structures_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        make_format("int4", **kw)


@pytest.mark.parametrize("name", NAMES)
def test_rows_must_split_into_blocks(name):
    q = Quantizer(make_format(name))
    block = 256 if name.endswith("_k") else 32
    cols = block + 16
    with pytest.raises(FormatError, match=rf"{name} quantizes .*{block} elements.*shape \(4, {cols}\)"):
        q.quantize(torch.randn(4, cols))


# ----------------------------------------------------------------------------- grids and rules
@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    clip=st.sampled_from(["minmax", "mse", "llama.cpp"]),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-4, 1.0, 300.0]),
)
def test_stored_parameters_are_representable_and_codes_decode_to_grid_values(name, clip, seed, scale):
    q = Quantizer(make_format(name, clip=clip, clip_grid=4))
    w = weights(seed, rows=6, scale=scale)
    qt = q.quantize(w)
    fp16 = [qt.scale] if qt.super_scale is None else [qt.super_scale]
    fp16 += [t for t in (qt.super_min,) if t is not None]
    if qt.zero is not None and qt.super_min is None:
        fp16.append(qt.zero)
    for t in fp16:  # every float field is an fp16 number
        assert torch.equal(t, t.half().float())
    if q.spec.super_block:  # sub-block scales and mins are small integers
        lo, hi = {"uint4": (0, 15), "uint6": (0, 63), "int6": (-32, 31), "int8": (-128, 127)}[q.spec.scale_dtype]
        assert torch.equal(qt.scale, qt.scale.round()) and qt.scale.min() >= lo and qt.scale.max() <= hi
        if qt.zero is not None:
            top = 15 if q.spec.zero_dtype == "uint4" else 63
            assert torch.equal(qt.zero, qt.zero.round()) and qt.zero.min() >= 0 and qt.zero.max() <= top
    deq = q.dequantize(qt)
    grid = grid_values(q, qt)
    assert torch.equal(deq, grid.gather(-1, qt.codes.long()[..., None])[..., 0])


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(NAMES), clip=st.sampled_from(["minmax", "mse"]), seed=st.integers(0, 10_000))
def test_lowbits_rule_rounds_every_weight_to_its_nearest_grid_value(name, clip, seed):
    q = Quantizer(make_format(name, clip=clip, clip_grid=4))
    w = weights(seed, rows=6)
    qt = q.quantize(w)
    err = (w - q.dequantize(qt)).abs()
    best = (w[..., None] - grid_values(q, qt)).abs().amin(-1)
    assert torch.all(err <= best + 1e-6 * w.abs().amax())


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quant_super_blocks_share_their_super_scale(name):
    q = Quantizer(make_format(name))
    qt = q.quantize(weights(0))
    blocks = 512 // 256
    assert qt.super_scale.shape == (8, blocks) and qt.scale.shape == (8, 512 // q.spec.group_size)
    # lowbit's rule: the largest sub-block scale takes the top integer of the range
    top = {"uint4": 15, "uint6": 63, "int6": 31, "int8": 127}[q.spec.scale_dtype]
    per_block = qt.scale.reshape(8, blocks, -1).amax(-1)
    assert torch.all((per_block == top) | (qt.super_scale == 0))
    assert torch.all(qt.super_scale[0, 0] == 0)  # the all-zero super-block


@pytest.mark.parametrize("name", [n for n in NAMES if n not in K_QUANTS])
def test_mse_rule_does_not_increase_the_tensor_error(name):
    # each group's candidates include min-max's parameters (not so with a shared super-scale)
    w = weights(3, rows=16)
    errors = {}
    for clip in ("minmax", "mse"):
        q = Quantizer(make_format(name, clip=clip))
        errors[clip] = float((q.dequantize(q.quantize(w)) - w).pow(2).sum())
    assert errors["mse"] <= errors["minmax"] * (1 + 1e-6)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q3_k", "q4_k"])
def test_fake_quant_and_row_slices(name):
    q = Quantizer(make_format(name))
    w = weights(4, rows=6)
    qt = q.quantize(w)
    whole = q.dequantize(qt)
    torch.testing.assert_close(q.fake_quant(w), whole)  # x + (dq - x): dq up to rounding
    for start, stop in [(0, 2), (2, 6)]:
        assert torch.equal(q.dequantize(qt.rows(start, stop)), whole[start:stop])


def test_llama_cpp_rule_handles_all_zero_blocks_like_the_reference():
    w = torch.zeros(2, 256)
    w[1, 100] = 1.0
    for name in NAMES:
        q = Quantizer(make_format(name, clip="llama.cpp"))
        deq = q.dequantize(q.quantize(w))
        assert torch.all(deq[0] == 0) and torch.isfinite(deq).all()


def test_grid_values_helper_agrees_with_a_scalar_formula():
    """The helper the tests decode with, against ggml's scalar formula for one element per type."""
    for name, (r, c) in itertools.product(["q4_1", "q4_k", "q6_k"], [(1, 3), (4, 300)]):
        q = Quantizer(make_format(name))
        qt = q.quantize(weights(5, rows=6))
        g, code = c // q.spec.group_size, int(qt.codes[r, c])
        d = float(qt.scale[r, g]) * (1.0 if qt.super_scale is None else float(qt.super_scale[r, c // 256]))
        if name == "q6_k":
            value = d * (code - 32)
        else:
            m = float(qt.zero[r, g]) * (1.0 if qt.super_min is None else float(qt.super_min[r, c // 256]))
            value = d * code - m
        assert float(grid_values(q, qt)[r, c, code]) == pytest.approx(value, rel=1e-6, abs=1e-12)
