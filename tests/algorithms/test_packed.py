"""The packed (one-triangle) Hessian: layout against LAPACK's own conversion, in-place algebra
against dense torch, and GPTQ on a packed Hessian against GPTQ on the same dense one."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import lapack

from lowbit.algorithms.gptq import _rtn_and_base_errors
from lowbit.algorithms.gptq_solver import gptq_quantize
from lowbit.algorithms.hessian import HessianAccumulator, HessianNotPositiveDefinite, inverse_cholesky_factor
from lowbit.algorithms.packed import PackedSymmetric
from lowbit.formats import Quantizer, make_format


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n + 3, generator=g, dtype=torch.float64)
    H = A @ A.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    return (H + H.T) / 2


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 41))
def test_layout_is_lapacks_rectangular_full_packed_format(n):
    dense = np.asfortranarray(np.tril(np.arange(1.0, n * n + 1).reshape(n, n)), dtype=np.float32)
    reference, info = lapack.strttf(dense, transr="N", uplo="L")
    assert info == 0
    packed = PackedSymmetric(n)
    i, j = torch.tril_indices(n, n)
    packed.data[packed.index(i, j)] = torch.from_numpy(dense)[i, j]
    np.testing.assert_array_equal(packed.data.numpy(), reference.reshape(-1, order="F"))
    for r in range(n):  # the fast row positions agree with the general index
        np.testing.assert_array_equal(packed.row_positions(r), packed.index(torch.tensor(r), torch.arange(n)).numpy())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_permutation_swaps_and_bands_match_dense(n, seed):
    H = spd(n, seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    packed = PackedSymmetric.from_dense(H)
    assert torch.equal(packed.to_dense(), H)
    packed.permute_(perm)
    expected = H[perm][:, perm]
    assert torch.equal(packed.to_dense(), expected)
    a, b = sorted(torch.randint(0, n + 1, (2,), generator=torch.Generator().manual_seed(seed)).tolist())
    assert torch.equal(packed.columns(a, b), expected[:, a:b])
    assert torch.equal(packed.diagonal(), torch.diag(expected))


@pytest.mark.parametrize("n", [6, 7])
def test_rank_updates_accumulate_the_same_hessian_as_dense(n):
    x = torch.randn(500, n)
    dense, packed = HessianAccumulator(n, packed=False), HessianAccumulator(n, packed=True)
    assert isinstance(packed.H, PackedSymmetric)
    for part in x.split(77):
        dense.add(part)
        packed.add(part)
    torch.testing.assert_close(packed.H.to_dense(), dense.H, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense.H, 2 * x.T @ x / 500, rtol=1e-4, atol=1e-5)


def test_wide_cpu_hessians_are_packed_by_default():
    from lowbit.algorithms.hessian import PACKED_MIN_COLUMNS

    assert isinstance(HessianAccumulator(PACKED_MIN_COLUMNS).H, PackedSymmetric)
    assert isinstance(HessianAccumulator(PACKED_MIN_COLUMNS - 1).H, torch.Tensor)
    assert PackedSymmetric(PACKED_MIN_COLUMNS).data.numel() == PACKED_MIN_COLUMNS * (PACKED_MIN_COLUMNS + 1) // 2


@pytest.mark.parametrize("n", [10, 11])
def test_factorisation_in_place_with_retries_matches_torch(n):
    H = spd(n, 0)
    eigvals, vecs = torch.linalg.eigh(H)
    eigvals[:2] = -0.05 * eigvals.mean()  # indefinite: needs more damping than the first try
    for target in (H, (vecs * eigvals) @ vecs.T):
        target = (target + target.T) / 2
        packed = PackedSymmetric.from_dense(target)
        storage = packed.data.data_ptr()
        factor, damp = inverse_cholesky_factor(packed, 0.01, 4)
        assert factor is packed and factor.data.data_ptr() == storage  # in place
        Hd = target + damp * torch.diag(target).mean() * torch.eye(n, dtype=target.dtype)
        U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
        for a in range(0, n, 4):
            torch.testing.assert_close(factor.factor_rows(a, min(a + 4, n)), U[a : a + 4, a:])
    with pytest.raises(HessianNotPositiveDefinite):
        inverse_cholesky_factor(PackedSymmetric.from_dense(-torch.eye(n, dtype=torch.float64)), 0.01, 2)


@pytest.mark.parametrize("cols,fmt", [(256, ("int4", 64)), (255, ("int4", -1)), (128, ("nf4", 32))])
@pytest.mark.parametrize("act_order,static_groups", [(True, True), (True, False), (False, False)])
def test_gptq_on_a_packed_hessian_matches_dense(cols, fmt, act_order, static_groups):
    g = torch.Generator().manual_seed(cols)
    x = torch.randn(2000, cols, generator=g) @ (torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5)
    x[:, :3] *= 8
    x[:, 7] = 0  # a dead input
    W = torch.randn(48, cols, generator=g)
    dense, packed = HessianAccumulator(cols, packed=False), HessianAccumulator(cols, packed=True)
    for part in x.split(600):
        dense.add(part)
        packed.add(part)
    q = Quantizer(make_format(fmt[0], group_size=fmt[1]))
    kw = dict(block_size=64, act_order=act_order, static_groups=static_groups)
    a = gptq_quantize(W, dense.H, q, **kw)
    kept = packed.H.data.clone()
    b = gptq_quantize(W, packed.H, q, **kw)
    assert torch.equal(packed.H.data, kept)  # not overwritten unless allowed
    # Float-level differences in H may flip a rounding decision now and then; the losses agree.
    assert (a.qtensor.codes == b.qtensor.codes).float().mean() > 0.995
    assert b.loss == pytest.approx(a.loss, rel=1e-3)
    assert torch.equal(b.qtensor.codes[:, 7] == a.qtensor.codes[:, 7], torch.ones(48, dtype=torch.bool))
    for got, want in zip(_rtn_and_base_errors(W, packed.H, q), _rtn_and_base_errors(W, dense.H, q)):
        assert got == pytest.approx(want, rel=1e-4)
    c = gptq_quantize(W, packed.H, q, overwrite_hessian=True, **kw)
    assert torch.equal(c.qtensor.codes, b.qtensor.codes)


@pytest.mark.parametrize(
    "fmt,kw",
    [
        ("int4", dict(group_size=32, symmetric=False)),
        ("int3", dict(group_size=-1)),
        ("int8", dict(group_size=0)),  # per tensor: one pass whatever the bound
        ("nvfp4", {}),  # a global scale over all rows
    ],
)
@pytest.mark.parametrize("act_order,static_groups", [(True, True), (True, False), (False, False)])
def test_row_passes_give_the_same_result_as_one_pass(fmt, kw, act_order, static_groups):
    g = torch.Generator().manual_seed(7)
    cols = 128
    x = torch.randn(1000, cols, generator=g) @ (torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5)
    x[:, 5] = 0
    acc = HessianAccumulator(cols, packed=True)
    acc.add(x)
    W = torch.randn(45, cols, generator=g) * torch.rand(45, 1, generator=g)
    q = Quantizer(make_format(fmt, **kw))
    opts = dict(block_size=32, act_order=act_order, static_groups=static_groups)
    one = gptq_quantize(W, acc.H, q, **opts)
    # 4 KiB of float32 working rows: 8 rows per pass, the last pass shorter
    passes = gptq_quantize(W, acc.H, q, max_working_mib=4 / 1024, **opts)
    for field in ("codes", "scale", "zero", "global_scale", "g_idx"):
        a, b = getattr(one.qtensor, field), getattr(passes.qtensor, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert passes.loss == pytest.approx(one.loss, rel=1e-6)  # summed in another order


@pytest.mark.parametrize("fmt,kw", [("int4", dict(group_size=32, symmetric=False, clip="mse")), ("nf4", {})])
def test_parameters_found_a_few_rows_at_a_time_equal_all_at_once(fmt, kw):
    from lowbit.algorithms.gptq_solver import _params_of_rows

    q = Quantizer(make_format(fmt, **kw))
    Wt = torch.randn(128, 45, generator=torch.Generator().manual_seed(3))  # 45 rows, transposed
    whole = q.find_params(q.group_view(Wt.T))
    chunked = _params_of_rows(q, Wt, None, chunk=7)
    assert torch.equal(chunked.scale, whole.scale)
    assert (whole.zero is None and chunked.zero is None) or torch.equal(chunked.zero, whole.zero)
