"""lowbit's C int4 kernel against a plain transcription of what it computes."""

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels import KernelBuildError, build, int4_alignment, int4_gemm, pack_int4, unpack_int4

needs_kernel = pytest.mark.skipif(int4_alignment() is None, reason="no C compiler here")


def test_the_kernel_builds_where_a_compiler_exists():
    if shutil.which("cc") or shutil.which("gcc"):
        assert build().exists() and int4_alignment() in (32, 64)


def test_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    with pytest.raises(KernelBuildError, match="compiling lowbit's C kernels failed"):
        build("/nonexistent/cc")
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), runs=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trips(rows, runs, seed):
    codes = torch.randint(0, 16, (rows, 32 * runs), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (rows, 16 * runs) and torch.equal(unpack_int4(packed), codes)


def reference(x: torch.Tensor, codes, scale, offset, group) -> torch.Tensor:
    """The kernel's arithmetic, transcribed: x rounded to int8 per 32 inputs (absmax / 127, ties to
    even), then the exact product with the dequantized weight, in float64."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    rounded = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0) * d
    w = codes.double() * scale.double().repeat_interleave(group, 1) + offset.double().repeat_interleave(group, 1)
    return rounded.reshape(x.shape).double() @ w.T


@needs_kernel
@pytest.mark.parametrize("group", [64, 128, 256])
@pytest.mark.parametrize("m", [1, 3, 4, 9])
def test_int4_gemm_matches_the_transcription(group, m):
    gen = torch.Generator().manual_seed(group + m)
    n, k = 96, 512
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=gen) * 0.1
    offset = -8 * scale + 0.01 * torch.randn(n, k // group, generator=gen)
    x = torch.randn(m, k, generator=gen) * torch.linspace(0.1, 10, k)  # uneven ranges, as activations
    x[0, :64] = 0  # an all-zero block: scale 0
    y = int4_gemm(x, pack_int4(codes), scale, offset, group)
    expected = reference(x, codes, scale, offset, group)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert float((y.double() - expected).abs().max() / expected.abs().max()) < 1e-5


@needs_kernel
def test_rounding_the_activations_costs_a_few_times_what_bfloat16_does():
    """Int8 per 32 inputs keeps 7 bits relative to the block's largest input, bf16 8 relative to each
    input: about 3x the error on Gaussian inputs, half a percent of the output."""
    gen = torch.Generator().manual_seed(0)
    n, k, group = 256, 1024, 128
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=gen)
    offset = -8 * scale
    w = (codes.float() - 8) * scale.repeat_interleave(group, 1)
    x = torch.randn(4, k, generator=gen)
    exact = x.double() @ w.double().T
    error = float((int4_gemm(x, pack_int4(codes), scale, offset, group).double() - exact).norm() / exact.norm())
    bf16 = float(((x.bfloat16().double() @ w.double().T) - exact).norm() / exact.norm())
    assert error < 5 * bf16 and error < 1e-2


@needs_kernel
def test_group_sizes_the_kernel_cannot_take_are_refused():
    align = int4_alignment()
    codes = torch.zeros(32, 4 * align, dtype=torch.uint8)
    group = align // 2
    with pytest.raises(ValueError, match=f"multiple of {align}"):
        int4_gemm(torch.ones(1, 4 * align), pack_int4(codes), torch.ones(32, 8), torch.zeros(32, 8), group)
