import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.algorithms.gptq import HessianNotPositiveDefinite, gptq_quantize
from lowbit.algorithms.hessian import HessianAccumulator, output_error
from lowbit.formats import Quantizer, make_format


def layer(seed, rows=64, cols=256, tokens=2048):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(tokens, cols, generator=gen) @ mix
    x[:, :4] *= 8  # a few outlier input channels, as real activations have
    acc = HessianAccumulator(cols)
    for chunk in x.split(500):
        acc.add(chunk)
    return torch.randn(rows, cols, generator=gen), acc.H, x


def test_hessian_is_twice_the_mean_outer_product_regardless_of_batching():
    _, H, x = layer(0, tokens=1234)
    assert torch.allclose(H, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 1000),
    fmt=st.sampled_from(
        [("int4", 64), ("int3", 64), ("int2", 32), ("nf4", 64), ("fp4", 32), ("mxfp4", 32), ("int4", -1)]
    ),
    symmetric=st.booleans(),
    act_order=st.booleans(),
    static_groups=st.booleans(),
)
def test_gptq_output_error_is_at_most_rtn_on_the_same_hessian(seed, fmt, symmetric, act_order, static_groups):
    name, gs = fmt
    kw = {"group_size": gs}
    if name.startswith("int"):
        kw["symmetric"] = symmetric
    q = Quantizer(make_format(name, **kw))
    W, H, _ = layer(seed)
    res = gptq_quantize(W, H, q, block_size=64, act_order=act_order, static_groups=static_groups)
    rtn = q.dequantize(q.quantize(W))
    assert output_error(W - q.dequantize(res.qtensor), H) <= output_error(W - rtn, H)
    # the loss GPTQ accumulates is exactly the output error on the damped Hessian
    Hd = H.clone()
    Hd.diagonal().add_(res.dampening * H.diagonal().mean())
    assert res.loss == pytest.approx(output_error(W - q.dequantize(res.qtensor), Hd), rel=1e-4)


def test_act_order_without_static_groups_records_the_group_of_each_column():
    q = Quantizer(make_format("int4", group_size=32))
    W, H, _ = layer(1)
    res = gptq_quantize(W, H, q, act_order=True)
    g_idx = res.qtensor.g_idx
    assert g_idx is not None and g_idx.shape == (W.shape[1],)
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((W.shape[1] // 32,), 32))
    static = gptq_quantize(W, H, q, act_order=True, static_groups=True)
    assert static.qtensor.g_idx is None


def test_the_hessian_is_only_overwritten_when_allowed():
    q = Quantizer(make_format("int4", group_size=64))
    W, H, _ = layer(5)
    keep = H.clone()
    a = gptq_quantize(W, H, q)
    assert torch.equal(H, keep)
    b = gptq_quantize(W, H, q, overwrite_hessian=True)
    assert torch.equal(a.qtensor.codes, b.qtensor.codes)


def test_dead_inputs_are_handled_like_the_reference():
    q = Quantizer(make_format("int4", group_size=64))
    W, H, _ = layer(2)
    H[:, 5] = 0
    H[5, :] = 0
    res = gptq_quantize(W, H, q)
    deq = q.dequantize(res.qtensor)
    assert torch.isfinite(deq).all()
    assert torch.all(deq[:, 5] == 0)


def test_damping_is_raised_until_the_cholesky_exists():
    q = Quantizer(make_format("int4", group_size=64))
    W, H, _ = layer(3)
    eigvals, eigvecs = torch.linalg.eigh(H)
    eigvals[:8] = -0.05 * eigvals.mean()  # indefinite, but fixable with more damping
    H_bad = eigvecs @ torch.diag(eigvals) @ eigvecs.T
    res = gptq_quantize(W, H_bad, q, dampening=0.01, damping_retries=4)
    assert res.dampening > 0.01
    assert torch.isfinite(q.dequantize(res.qtensor)).all()
    with pytest.raises(HessianNotPositiveDefinite):
        gptq_quantize(W, -torch.eye(W.shape[1]), q, damping_retries=2)


def test_per_tensor_and_per_channel_granularity():
    W, H, _ = layer(4)
    for gs in (0, -1):
        q = Quantizer(make_format("int8", group_size=gs))
        res = gptq_quantize(W, H, q)
        rtn = q.dequantize(q.quantize(W))
        assert output_error(W - q.dequantize(res.qtensor), H) <= output_error(W - rtn, H)


@pytest.mark.parametrize("in_place", [True, False])
def test_in_place_factorisation_matches_torch_and_survives_retries(in_place):
    from lowbit.algorithms.hessian import inverse_cholesky_factor

    torch.manual_seed(3)
    X = torch.randn(200, 64, dtype=torch.float64)
    eigvals, vecs = torch.linalg.eigh(X.T @ X / 200)
    eigvals[:4] = -0.05 * eigvals.mean()  # needs a second attempt with more damping
    for H in (X.T @ X / 200, (vecs * eigvals) @ vecs.T):
        H = (H + H.T) / 2
        storage = H.clone()
        U, damp = inverse_cholesky_factor(storage, 0.01, 4, in_place=in_place)
        assert (U.data_ptr() == storage.data_ptr()) == in_place  # in place: no second matrix
        assert U.is_contiguous() and not U.tril(-1).any()  # upper triangular, rows contiguous for GPTQ's walk
        Hd = H + damp * H.diagonal().mean() * torch.eye(64, dtype=H.dtype)
        expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
        torch.testing.assert_close(U.triu(), expected)
        torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_in_place_permutations(n, seed):
    from lowbit.algorithms.hessian import permute_rows_, permute_symmetric_

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    A = torch.randn(n, n, generator=g)
    H = A @ A.T
    W = torch.randn(n, 3, generator=g)
    expected_h, expected_w = H[perm][:, perm], W[perm]
    permute_symmetric_(H, perm, chunk=7)
    permute_rows_(W, perm)
    assert torch.equal(H, expected_h) and torch.equal(W, expected_w)


def _reference_gptq(W, H, bits, group_size, symmetric, block_size=128, percdamp=0.01):
    """The reference implementation's ``fasterquant`` (Frantar et al.), transcribed plainly: min-max
    parameters per group found when the walk reaches the group, from ``W`` (which lags the lazy
    batch's feedback), no act-order. Returns the integer codes."""
    W = W.clone().double()
    H = H.clone().double()
    rows, cols = W.shape
    maxq = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.long)
    scale = zero = None

    def find_params(x):
        xmin = torch.clamp(x.min(1).values, max=0)
        xmax = torch.clamp(x.max(1).values, min=0)
        if symmetric:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        s = (xmax - xmin) / maxq
        z = torch.full_like(s, (maxq + 1) / 2) if symmetric else torch.round(-xmin / s)
        return s, z

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % group_size == 0:
                scale, zero = find_params(W[:, i1 + i : i1 + i + group_size])
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            codes[:, i1 + i] = q.long()
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size,block_size", [(32, 128), (64, 64), (128, 128)])
def test_gptq_gives_the_reference_implementations_codes(symmetric, group_size, block_size):
    """lowbit's GPTQ against a plain transcription of the reference code. With ``dynamic_groups="reference"``
    the codes agree everywhere (up to float-level ties); lowbit's default takes a group's parameters from the
    weights after the current lazy batch's feedback, which differs only when a group starts inside a batch."""
    W, H, _ = layer(7, rows=48, cols=256)
    fmt = make_format("int4", group_size=group_size, symmetric=symmetric, scale_dtype="float32", zero_dtype="float32")
    q = Quantizer(fmt)
    expected = _reference_gptq(W, H, 4, group_size, symmetric, block_size)
    ours = gptq_quantize(W, H, q, block_size=block_size, act_order=False, dynamic_groups="reference")
    agree = (ours.qtensor.codes.long() == expected).float().mean()
    assert agree > 0.999, agree
    default = gptq_quantize(W, H, q, block_size=block_size, act_order=False)
    same = torch.equal(default.qtensor.codes, ours.qtensor.codes)
    assert same == (group_size % block_size == 0)
