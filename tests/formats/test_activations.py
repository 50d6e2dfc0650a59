"""Activation quantization schemes, checked against compressed-tensors' own fake quantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.algorithms import StepConfigError, build_step
from lowbit.formats.activations import ActivationScheme, InputQuantizer, StaticObserver, attach_input_quantizer

ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402


def _ct_args(scheme: ActivationScheme) -> QuantizationArgs:
    return QuantizationArgs(**scheme.compressed_tensors_args())


def _ct_token_fake_quant(x: torch.Tensor, scheme: ActivationScheme) -> torch.Tensor:
    """compressed-tensors' dynamic per-token quantization, written with its own functions: the scale
    of each row from its min and max (``calculate_qparams``), then ``fake_quantize``."""
    from compressed_tensors.quantization.utils import calculate_qparams

    args = _ct_args(scheme)
    rows = x.reshape(-1, x.shape[-1])
    lo = rows.amin(-1, keepdim=True).clamp(max=0)
    hi = rows.amax(-1, keepdim=True).clamp(min=0)
    scale, zero = calculate_qparams(lo, hi, args)
    return ct_forward.fake_quantize(rows, scale, zero, args).reshape(x.shape)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.01, 100.0))
def test_dynamic_per_token_matches_compressed_tensors(fmt, seed, spread):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 64, generator=gen) * spread
    x[..., 5] *= 20  # an outlier channel
    scheme = ActivationScheme(format=fmt, dynamic=True)
    ours = InputQuantizer(scheme)(x)
    theirs = _ct_token_fake_quant(x, scheme)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6 * float(x.abs().max()))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_static_per_tensor_matches_compressed_tensors(seed):
    x = torch.randn(4, 9, 32, generator=torch.Generator().manual_seed(seed)) * 3
    scheme = ActivationScheme(format="int8", dynamic=False)
    scale = torch.tensor([0.02])
    ours = InputQuantizer(scheme)(x, scale)
    theirs = ct_forward.fake_quantize(x, scale, torch.zeros(1, dtype=torch.int8), _ct_args(scheme))
    assert torch.equal(ours, theirs)
    assert float((ours - x).abs().max()) > 0.1  # values beyond 127 * 0.02 are clipped


def test_observers_against_their_definitions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=gen) ** 3  # heavy tails: outliers stretch the range
    for observer in ("minmax", "percentile", "mse"):
        scheme = ActivationScheme(format="int8", dynamic=False, observer=observer, percentile=99.9)
        obs = StaticObserver(scheme)
        for part in x.split(1000):
            obs.add(part)
        scale = float(obs.scale())
        if observer == "minmax":
            assert scale == pytest.approx(float(x.abs().max()) / 127.5, rel=1e-6)
        elif observer == "percentile":
            expected = np.percentile(x.abs().numpy(), 99.9, method="nearest") / 127.5
            assert scale == pytest.approx(expected, rel=1e-3)
        else:
            q = InputQuantizer(scheme)

            def err(s, q=q):
                return float((q(x, torch.tensor([s])) - x).pow(2).sum())

            minmax = float(x.abs().max()) / 127.5
            assert err(scale) <= err(minmax)  # the search includes the min-max range
            assert scale < minmax  # and on heavy tails it clips


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_block_formats_are_dynamic_per_group(fmt):
    scheme = ActivationScheme(format=fmt)
    x = torch.randn(2, 5, 64)
    x[..., :16] *= 100  # one block of large values must not coarsen the others
    y = InputQuantizer(scheme)(x)
    assert torch.allclose(y[..., 32:], x[..., 32:], rtol=0.35, atol=0.3)
    with pytest.raises(ValueError, match="needs dynamic"):
        ActivationScheme(format=fmt, dynamic=False)


def test_bad_schemes_name_the_field():
    with pytest.raises(StepConfigError, match="input_activations.*format"):
        build_step("rtn", {"format": "int8", "input_activations": {"format": "nf4"}})
    with pytest.raises(StepConfigError, match="input_activations.percentile"):
        build_step("rtn", {"input_activations": {"format": "int8", "dynamic": False, "percentile": 20}})
    with pytest.raises(StepConfigError, match="zero-point"):
        build_step("rtn", {"input_activations": {"format": "int8", "dynamic": False, "symmetric": False}})


def test_static_steps_need_calibration_dynamic_ones_do_not():
    assert not build_step("rtn", {"input_activations": {"format": "int8"}}).needs_calibration
    assert build_step("rtn", {"input_activations": {"format": "int8", "dynamic": False}}).needs_calibration


def test_attached_quantizer_changes_only_the_input():
    lin = torch.nn.Linear(64, 8)
    x = torch.randn(5, 64)
    before = lin(x)
    attach_input_quantizer(lin, ActivationScheme(format="int4"))
    after = lin(x)
    expected = torch.nn.functional.linear(InputQuantizer(ActivationScheme(format="int4"))(x), lin.weight, lin.bias)
    assert torch.equal(after, expected)
    assert not torch.equal(after, before)
    with pytest.raises(ValueError, match="static scheme needs"):
        attach_input_quantizer(lin, ActivationScheme(format="int8", dynamic=False))


@pytest.mark.parametrize(("fmt", "dtype"), [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_rounds_like_a_cast_ties_to_even(fmt, dtype):
    """Values exactly between two FP8 neighbours go to the even one, as torch's cast (and engines) do."""
    from lowbit.formats import make_format
    from lowbit.formats.grids import table_for

    grid = table_for(make_format(fmt))
    mids = grid.midpoints
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([mids, -mids, torch.randn(20000, generator=gen) * 30]).clamp(-grid.max_abs, grid.max_abs)
    assert torch.equal(grid.round(x), x.to(dtype).float())
