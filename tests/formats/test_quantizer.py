import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import FormatError, Quantizer, fp_code_values, make_format, nf4_values
from lowbit.formats.grids import table_for


def _weights(seed, rows=8, cols=256, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * scale


# ----------------------------------------------------------------------------- integer formats
@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    group=st.sampled_from([-1, 16, 32, 64]),
    seed=st.integers(0, 10_000),
    scale=st.floats(1e-3, 1e3),
)
def test_int_error_at_most_half_a_step_inside_the_clip_range(bits, symmetric, group, seed, scale):
    q = Quantizer(make_format("int", bits=bits, symmetric=symmetric, group_size=group, scale_dtype="float32"))
    w = _weights(seed, 4, 64, scale)
    qt = q.quantize(w)
    deq = q.dequantize(qt)
    step = q.group_view(
        qt.scale.repeat_interleave(q.group_size_for(64), dim=-1) if group != -1 else qt.scale.expand(4, 64)
    )
    step = step.reshape(4, 64)
    zero = (
        2 ** (bits - 1)
        if symmetric
        else q.group_view(
            qt.zero.repeat_interleave(q.group_size_for(64), dim=-1) if group != -1 else qt.zero.expand(4, 64)
        ).reshape(4, 64)
    )
    lo, hi = (0 - zero) * step, ((1 << bits) - 1 - zero) * step
    inside = (w >= lo) & (w <= hi)
    err = (w - deq).abs()
    assert torch.all(err[inside] <= step[inside] / 2 * (1 + 1e-4) + 1e-12)
    # min-max clipping keeps every element within half a step of the range
    assert torch.all(err <= step / 2 * (1 + 1e-4) + 1e-12)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    name=st.sampled_from(["fp8", "fp8_e5m2", "fp6", "fp6_e2m3", "fp4", "nf4", "mxfp4", "nvfp4"]),
)
def test_table_formats_round_to_the_nearest_grid_point(seed, name):
    q = Quantizer(make_format(name))
    w = _weights(seed, 4, 128)
    qt = q.quantize(w)
    deq = q.dequantize(qt)
    p = qt.params()
    scale = q.group_view(w)  # shape only
    eff = p.effective_scale().expand_as(scale).reshape(w.shape)
    grid = q.table.sorted_values
    # every candidate grid value is at least as far from w as the chosen one
    cands = grid[None, None, :] * eff[..., None]
    best = (w[..., None] - cands).abs().min(-1).values
    assert torch.allclose((w - deq).abs(), best, rtol=1e-5, atol=1e-7)


def test_int_codes_are_unsigned_and_in_range():
    for sym in (True, False):
        q = Quantizer(make_format("int3", symmetric=sym, group_size=32))
        qt = q.quantize(_weights(0, 4, 64))
        assert qt.codes.dtype == torch.uint8
        assert int(qt.codes.max()) <= 7


# ----------------------------------------------------------------------------- minifloats
def test_fp4_e2m1_grid():
    vals = fp_code_values("e2m1")
    pos = sorted({abs(v) for v in vals.tolist()})
    assert pos == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize(
    "element,maximum", [("e4m3", 448.0), ("e5m2", 57344.0), ("e3m2", 28.0), ("e2m3", 7.5), ("e2m1", 6.0)]
)
def test_minifloat_maxima(element, maximum):
    vals = fp_code_values(element)
    assert float(vals[torch.isfinite(vals)].max()) == maximum


@pytest.mark.parametrize("element,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_rounding_matches_torch_casts(element, dtype):
    grid = table_for(make_format("fp8_" + element))
    x = torch.randn(20000) * 30
    limit = float(grid.sorted_values.max())
    x = x.clamp(-limit, limit)
    ours = grid.round(x)
    theirs = x.to(dtype).float()
    assert torch.equal(ours, theirs)


def test_fp8_codes_are_the_bit_patterns():
    q = Quantizer(make_format("fp8", group_size=0, scale_dtype="float32"))
    x = torch.tensor([[1.0, -2.0, 0.5, 448.0]])
    qt = q.quantize(x)
    as_bytes = (x / qt.scale).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(qt.codes, as_bytes)


# ----------------------------------------------------------------------------- microscaling
def test_mxfp4_shared_scale_is_a_power_of_two_from_the_spec():
    q = Quantizer(make_format("mxfp4"))
    w = _weights(3, 2, 64)
    qt = q.quantize(w)
    amax = w.abs().reshape(2, 2, 32).amax(-1)
    expected = torch.exp2(torch.floor(torch.log2(amax)) - 2)  # emax of E2M1 is 2
    assert torch.equal(qt.scale, expected)


def test_nvfp4_two_level_scales():
    q = Quantizer(make_format("nvfp4"))
    w = _weights(4, 4, 64)
    qt = q.quantize(w)
    assert qt.global_scale is not None
    assert torch.isclose(qt.global_scale, w.abs().max() / (448 * 6))
    # block scales are representable in E4M3
    assert torch.equal(qt.scale, qt.scale.to(torch.float8_e4m3fn).float())
    assert q.bits_per_weight(w.shape) == pytest.approx(4 + 8 / 16 + 32 / w.numel())


# ----------------------------------------------------------------------------- NF4, LUT, binary, ternary
def test_nf4_grid_matches_the_published_levels():
    vals = nf4_values()
    assert len(vals) == 16 and vals[0] == -1.0 and vals[-1] == 1.0 and 0.0 in vals
    # two levels from Table/Appendix of Dettmers et al. (2023)
    assert vals[14] == pytest.approx(0.7229568362236023, abs=1e-6)
    assert vals[1] == pytest.approx(-0.6961928009986877, abs=1e-6)


def test_user_lookup_table():
    q = Quantizer(
        make_format({"kind": "lut", "lut": [-1.0, -0.25, 0.0, 0.25, 1.0], "granularity": "channel", "group_size": None})
    )
    assert q.spec.bits == 3
    w = torch.tensor([[1.0, 0.2, -0.3, 0.01, -1.0]])
    deq = q.dequantize(q.quantize(w))
    assert torch.allclose(deq, torch.tensor([[1.0, 0.25, -0.25, 0.0, -1.0]]), atol=1e-3)


def test_binary_uses_the_l2_optimal_scale():
    q = Quantizer(make_format("binary", scale_dtype="float32"))
    w = _weights(5, 3, 64)
    deq = q.dequantize(q.quantize(w))
    expected = torch.sign(w) * w.abs().mean(-1, keepdim=True)
    assert torch.allclose(deq, expected, atol=1e-6)


def test_ternary_twn_and_absmean():
    w = _weights(6, 3, 128)
    twn = Quantizer(make_format("ternary", scale_dtype="float32"))
    deq = twn.dequantize(twn.quantize(w))
    assert set(torch.unique(torch.sign(deq)).tolist()) <= {-1.0, 0.0, 1.0}
    # TWN's scale: the mean magnitude of the weights above 0.7 E|w| ...
    delta = 0.7 * w.abs().mean(-1, keepdim=True)
    alpha = (w.abs() * (w.abs() > delta)).sum(-1, keepdim=True) / (w.abs() > delta).sum(-1, keepdim=True)
    assert torch.allclose(deq.abs().amax(-1, keepdim=True), alpha)
    # ... with the L2-optimal assignment for that scale (threshold alpha / 2)
    assert torch.equal(deq == 0, w.abs() < alpha / 2)
    bitnet = Quantizer(make_format("ternary", ternary_method="absmean", scale_dtype="float32"))
    deq2 = bitnet.dequantize(bitnet.quantize(w))
    s = w.abs().mean(-1, keepdim=True)
    assert torch.allclose(deq2, torch.clamp(torch.round(w / s), -1, 1) * s)


# ----------------------------------------------------------------------------- bits per weight
@pytest.mark.parametrize(
    "name,kw,shape,expected",
    [
        ("int4", {"symmetric": False, "group_size": 128}, (4096, 4096), 4.25),
        ("int4", {"group_size": 128}, (4096, 4096), 4.125),
        ("int8", {"group_size": -1}, (256, 1024), 8 + 16 / 1024),
        ("int4", {"symmetric": False, "group_size": 128, "zero_dtype": "int"}, (64, 256), 4 + 20 / 128),
        ("mxfp4", {}, (64, 256), 4.25),
        ("mxfp8", {}, (64, 256), 8.25),
        ("nf4", {}, (64, 256), 4.25),
        ("fp8", {"group_size": 0}, (64, 256), 8 + 32 / (64 * 256)),
        ("binary", {}, (64, 256), 1 + 16 / 256),
        ("ternary", {}, (64, 256), 2 + 16 / 256),
    ],
)
def test_bits_per_weight_is_exact(name, kw, shape, expected):
    q = Quantizer(make_format(name, **kw))
    assert q.bits_per_weight(shape) == expected
    # and it is what the stored tensors really take
    qt = q.quantize(torch.randn(*shape) if math.prod(shape) < 2e6 else torch.randn(64, shape[1]))
    if qt.shape == shape:
        stored = qt.codes.numel() * q.spec.bits + qt.scale.numel() * q.spec.scale_bits
        stored += 0 if qt.zero is None else qt.zero.numel() * q.spec.zero_bits
        stored += 32 if qt.global_scale is not None else 0
        assert stored / qt.codes.numel() == expected


# ----------------------------------------------------------------------------- clipping, STE, errors
def test_mse_clipping_never_increases_group_error():
    w = _weights(7, 16, 256)
    w[0, 3] = 25.0  # an outlier that min-max clipping would let dominate its group
    for name in ("int3", "fp4", "nf4"):
        base = Quantizer(make_format(name, group_size=64))
        mse = Quantizer(make_format(name, group_size=64, clip="mse", clip_grid=40))
        e_base = (base.dequantize(base.quantize(w)) - w).pow(2).reshape(16, 4, 64).sum(-1)
        e_mse = (mse.dequantize(mse.quantize(w)) - w).pow(2).reshape(16, 4, 64).sum(-1)
        assert torch.all(e_mse <= e_base * (1 + 1e-5) + 1e-9)
        assert e_mse.sum() < e_base.sum()


def test_fake_quant_has_a_straight_through_gradient():
    q = Quantizer(make_format("int4", group_size=32))
    x = torch.randn(4, 64, requires_grad=True)
    y = q.fake_quant(x)
    (y * torch.arange(64.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(64.0).expand(4, 64))
    assert torch.allclose(y.detach(), q.dequantize(q.quantize(x.detach())))


def test_per_token_activation_quantization():
    q = Quantizer(make_format("int8", granularity="token", group_size=None, scale_dtype="float32"))
    x = torch.randn(2, 5, 32)
    y = q.fake_quant(x)
    assert y.shape == x.shape
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.all((y - x).abs() <= amax / 127.5 / 2 + 1e-6)


def test_group_size_must_divide():
    q = Quantizer(make_format("int4", group_size=128))
    with pytest.raises(FormatError, match="group_size 128 does not divide the input dimension 200"):
        q.quantize(torch.randn(4, 200))


def test_nonfinite_weights_are_refused():
    w = torch.randn(4, 128)
    w[1, 2] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        Quantizer(make_format("int4")).quantize(w)


@pytest.mark.parametrize(
    "args,match",
    [
        (("int", {"bits": 9}), "bits must be between 1 and 8"),
        (("int", {"bits": 1}), "binary"),
        (("nope", {}), "unknown format 'nope'"),
        (("fp4", {"bits": 3}), "bits=3 does not match"),
        (("int4", {"group_size": -5}), "group_size"),
        (("mxfp4", {"group_size": 64}), "mxfp4 is defined with group_size=32"),
        (("nf4", {"symmetric": False}), "symmetric=False"),
        (("int4", {"clip_min_ratio": 0}), "clip_min_ratio"),
    ],
)
def test_format_errors_name_the_bad_field(args, match):
    name, kw = args
    with pytest.raises(ValueError, match=match):
        make_format(name, **kw)


def test_all_zero_and_tiny_groups_are_safe():
    for name in ("int4", "fp4", "nf4", "mxfp4", "nvfp4", "binary", "ternary"):
        q = Quantizer(make_format(name))
        w = torch.zeros(2, 128)
        w[1] = 1e-30
        deq = q.dequantize(q.quantize(w))
        assert torch.isfinite(deq).all()
        # binary has no zero level: the smallest fp16 scale is the best it can do
        assert deq.abs().max() <= (6.2e-5 if name == "binary" else 1e-6)


@pytest.mark.parametrize(
    "name,kw",
    [("int4", {"group_size": 32}), ("int3", {"group_size": -1}), ("int8", {"group_size": 0}), ("nvfp4", {})],
)
def test_row_slices_dequantize_to_the_rows_of_the_whole(name, kw):
    q = Quantizer(make_format(name, **kw))
    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    qt = q.quantize(w)
    whole = q.dequantize(qt)
    for start, stop in [(0, 10), (10, 37), (30, 100)]:
        part = qt.rows(start, stop)
        assert part.shape == tuple(whole[start:stop].shape)
        assert torch.equal(q.dequantize(part), whole[start:stop])
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(1)) // 32
    if name == "int4":  # act-order groups: every slice keeps the column map
        shuffled = type(qt)(qt.codes, qt.scale, qt.zero, qt.global_scale, qt.spec, qt.shape, g_idx.to(torch.int32))
        assert torch.equal(q.dequantize(shuffled.rows(5, 20)), q.dequantize(shuffled)[5:20])
