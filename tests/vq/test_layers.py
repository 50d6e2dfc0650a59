import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.vq import (
    BSQ,
    FSQ,
    LFQ,
    GroupedResidualVQ,
    ProductQuantize,
    ResidualVQ,
    VectorQuantize,
    VQOutput,
)

D = 8


def _layers(channel_dim: int) -> dict:
    return {
        "vq": lambda: VectorQuantize(dim=D, codebook_size=16, channel_dim=channel_dim, kmeans_init=True),
        "vq-cosine-rotation": lambda: VectorQuantize(
            dim=D, codebook_size=16, channel_dim=channel_dim, distance="cosine", gradient="rotation"
        ),
        "vq-learned": lambda: VectorQuantize(dim=D, codebook_size=16, channel_dim=channel_dim, ema=False),
        "simvq": lambda: VectorQuantize(dim=D, codebook_size=16, channel_dim=channel_dim, simvq=True, ema=False),
        "rvq": lambda: ResidualVQ(dim=D, num_quantizers=3, codebook_size=8, channel_dim=channel_dim),
        "grvq": lambda: GroupedResidualVQ(dim=D, groups=2, num_quantizers=2, codebook_size=8, channel_dim=channel_dim),
        "pq": lambda: ProductQuantize(dim=D, num_subvectors=4, codebook_size=8, channel_dim=channel_dim),
        "fsq": lambda: FSQ(levels=[5, 4, 3, 2, 2, 3, 4, 5], channel_dim=channel_dim),
        "lfq": lambda: LFQ(dim=D, channel_dim=channel_dim),
        "bsq": lambda: BSQ(dim=D, channel_dim=channel_dim),
    }


LAYER_NAMES = list(_layers(-1))
SHAPES = [((D, 7), 0), ((3, D, 4, 5), 1), ((2, 5, D), -1), ((2, 3, D, 4), 2), ((2, 3, D, 4), -2)]


@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize(("shape", "channel_dim"), SHAPES)
def test_shapes_for_any_channel_dim(name, shape, channel_dim):
    q = _layers(channel_dim)[name]()
    x = torch.randn(shape)
    out = q(x)
    assert isinstance(out, VQOutput)
    assert out.quantized.shape == x.shape and out.quantized.dtype == x.dtype
    c = channel_dim % len(shape)
    expected = shape[:c] + shape[c + 1 :] + ((q.num_codebooks,) if q.multi_codebook else ())
    assert tuple(out.indices.shape) == expected
    assert out.indices.dtype == torch.long
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(v.ndim == 0 for v in out.aux.values())


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_indices_to_codes_round_trip(name):
    q = _layers(1)[name]()
    x = torch.randn(4, D, 3, 3)
    q(x)  # a training step first (k-means init, EMA update), so the check is on a used layer
    q.eval()  # training forwards update EMA codebooks after the lookup; decode against a fixed codebook
    out = q(x)
    decoded = q.indices_to_codes(out.indices)
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded, out.quantized, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_gradient_reaches_the_input(name):
    q = _layers(-1)[name]()
    x = torch.randn(32, D, requires_grad=True)
    out = q(x)
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["vq", "vq-learned", "rvq", "pq", "lfq"])
def test_straight_through_passes_the_gradient_unchanged(name):
    q = _layers(-1)[name]()
    x = torch.randn(64, D, requires_grad=True)
    g = torch.randn(64, D)
    (q(x).quantized * g).sum().backward()
    torch.testing.assert_close(x.grad, g)


def test_rotation_trick_gradient_is_the_scaled_rotation():
    q = VectorQuantize(dim=D, codebook_size=16, gradient="rotation").eval()  # eval: no EMA step moves the codes
    x = torch.randn(32, D, requires_grad=True)
    out = q(x)
    torch.testing.assert_close(out.quantized, q.indices_to_codes(out.indices))  # forward value is the code
    g = torch.randn(32, D)
    (out.quantized * g).sum().backward()
    codes = q.indices_to_codes(out.indices)
    for i in range(8):
        e, c = x[i].detach(), codes[i]
        u, v = e / e.norm(), c / c.norm()
        w = (u + v) / (u + v).norm()
        rot = torch.eye(D) - 2 * torch.outer(w, w) + 2 * torch.outer(v, u)
        torch.testing.assert_close(rot @ u, v, atol=1e-5, rtol=1e-5)  # R maps x's direction onto the code's
        expected = (c.norm() / e.norm()) * rot.t() @ g[i]  # d(lambda R x)/dx applied to g
        torch.testing.assert_close(x.grad[i], expected, atol=1e-5, rtol=1e-4)
    # Orthogonal R: only the length of the gradient changes, by |q| / |x|; it is not the identity (STE) gradient.
    ratio = x.grad.norm(dim=1) / g.norm(dim=1)
    torch.testing.assert_close(ratio, codes.norm(dim=1) / x.detach().norm(dim=1), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(x.grad, g, atol=1e-3)


def test_rotation_trick_handles_zero_rows():
    q = VectorQuantize(dim=D, codebook_size=4, gradient="rotation")
    x = torch.zeros(3, D, requires_grad=True)
    q(x).quantized.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_fsq_codes_lie_on_the_grid_and_indices_are_a_bijection():
    levels = [5, 4, 3, 2]
    q = FSQ(levels=levels)
    x = torch.randn(8192, 4)
    out = q(x)
    for i, L in enumerate(levels):
        grid = torch.linspace(-1, 1, L)  # L evenly spaced points, symmetric about 0
        assert (out.quantized[:, i, None] - grid).abs().min(dim=1).values.max() < 1e-6
    assert set(out.indices.unique().tolist()) == set(range(math.prod(levels)))  # every code reachable
    all_codes = q.indices_to_codes(torch.arange(q.codebook_size))
    assert len(torch.unique(all_codes, dim=0)) == q.codebook_size  # index -> code is injective
    torch.testing.assert_close(q.codes_to_indices(all_codes), torch.arange(q.codebook_size))  # and inverted
    torch.testing.assert_close(q.codes_to_indices(out.quantized), out.indices)


def test_fsq_gradient_flows_through_the_bound():
    q = FSQ(levels=[7, 7])
    x = torch.randn(16, 2, requires_grad=True)
    q(x).quantized.sum().backward()
    assert (x.grad > 0).all()  # tanh' > 0 everywhere


def test_lfq_codes_are_signs_and_bsq_codes_on_the_unit_sphere():
    x = torch.randn(256, D)
    lfq, bsq = LFQ(dim=D), BSQ(dim=D)
    lq = lfq(x).quantized
    assert set(lq.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(lq, torch.where(x > 0, 1.0, -1.0))
    out = bsq(x)
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(256))
    torch.testing.assert_close(out.quantized.abs(), torch.full((256, D), 1 / math.sqrt(D)))
    all_codes = bsq.indices_to_codes(torch.arange(2**D))
    assert len(torch.unique(all_codes, dim=0)) == 2**D
    assert lfq(x).indices.max() < 2**D and lfq.bits_per_token == D


def test_lfq_entropy_loss_rewards_spread_usage():
    q = LFQ(dim=4, commitment_weight=0.0)
    spread = torch.tensor([[1.0 if (i >> b) & 1 else -1.0 for b in range(4)] for i in range(16)]).repeat(8, 1) * 3
    collapsed = torch.full((128, 4), 3.0)
    assert q(spread).loss < q(collapsed).loss
    out = q(spread)
    assert out.aux["codebook_entropy"] == pytest.approx(math.log(16), rel=1e-3)


def test_ema_update_moves_assigned_codes_toward_their_vectors():
    q = VectorQuantize(dim=2, codebook_size=3, decay=0.5)
    q.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]]))
    q.embed_sum.copy_(q.embed)
    q.cluster_size.fill_(1.0)
    q.initialized.fill_(True)
    x = torch.tensor([[1.0, 1.0], [1.2, 0.8], [9.0, 9.0], [8.0, 9.0]])
    before = q.embed.clone()
    q(x)
    targets = {0: x[:2].mean(0), 1: x[2:].mean(0)}
    for k, target in targets.items():
        assert (q.embed[k] - target).norm() < (before[k] - target).norm()
    torch.testing.assert_close(q.embed[2], before[2], atol=1e-3, rtol=0)  # unassigned code stays (up to smoothing)


@pytest.mark.parametrize("mode", ["ema", "learned", "simvq"])
def test_dead_code_restart_resets_state(mode):
    kwargs = {"ema": mode == "ema", "simvq": mode == "simvq"}
    q = VectorQuantize(dim=4, codebook_size=8, dead_code_threshold=2.0, decay=0.5, **kwargs)
    x = torch.randn(64, 4)
    q(x)  # initialise
    # Push codes 4..7 far away: they stop winning tokens and their usage (8 per step now) decays below 2.
    with torch.no_grad():
        q.cluster_size.fill_(8.0)
        if mode == "simvq":
            q.frozen_basis[4:] = 100.0 + torch.arange(16.0).view(4, 4)
        else:
            (q.embed.data if mode == "learned" else q.embed)[4:] = 100.0 + torch.arange(16.0).view(4, 4)
        if mode == "ema":
            q.embed_sum[4:] = q.embed[4:] * q.cluster_size[4:, None]
    restarted = 0
    for _ in range(4):
        restarted += int(q(x).aux["restarted"])
        if restarted:
            break
    assert restarted >= 4
    codebook = q.codebook().detach()
    for k in range(4, 8):
        nearest = (x - codebook[k]).norm(dim=1).min()
        assert nearest < 1e-3, f"code {k} was not moved onto a batch vector"
        assert q.cluster_size[k] >= 2.0  # usage reset, not left below the threshold
    if mode == "ema":
        torch.testing.assert_close(q.embed_sum[4:], q.embed[4:] * q.cluster_size[4:, None])  # consistent EMA state
        # Revived codes now win data, and the next EMA step updates them instead of leaving them stranded.
        idx = q(x).indices
        assert torch.isin(torch.arange(4, 8), idx).any()


def test_simvq_gradient_moves_every_code():
    q = VectorQuantize(dim=4, codebook_size=32, simvq=True, ema=False)
    assert not q.frozen_basis.requires_grad
    x = torch.randn(8, 4)
    out = q(x)
    used = out.indices.unique()
    before = q.codebook().detach().clone()
    out.loss.backward()
    with torch.no_grad():
        q.project.weight -= 0.1 * q.project.weight.grad
    after = q.codebook().detach()
    unused = torch.tensor([k for k in range(32) if k not in used.tolist()])
    assert ((after[unused] - before[unused]).norm(dim=1) > 0).all()  # the shared map updates unused codes too


def test_cosine_distance_outputs_unit_vectors():
    q = VectorQuantize(dim=D, codebook_size=16, distance="cosine")
    out = q(torch.randn(32, D) * 5)
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(32))


def test_kmeans_init_places_codes_on_clusters():
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    x = (centers.repeat(50, 1) + 0.1 * torch.randn(200, 2))[torch.randperm(200)]
    q = VectorQuantize(dim=2, codebook_size=4, kmeans_init=True, kmeans_iters=20)
    q(x)
    dist = torch.cdist(centers, q.embed)
    assert dist.min(dim=1).values.max() < 0.2


def test_residual_vq_error_drops_with_more_quantizers():
    q = ResidualVQ(dim=D, num_quantizers=4, codebook_size=16, vq={"kmeans_init": True})
    x = torch.randn(512, D)
    for _ in range(3):
        q(x)
    q.eval()
    errors = [float(F.mse_loss(q(x, n_quantizers=n).quantized, x)) for n in range(1, 5)]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.6 * errors[0]


def test_quantizer_dropout_trains_prefixes():
    # Learned (non-EMA) codebooks: a training forward leaves the codebook as it was, so decoding can be checked.
    q = ResidualVQ(dim=D, num_quantizers=4, codebook_size=8, quantizer_dropout=1.0, vq={"ema": False})
    x = torch.randn(16, D)
    active = set()
    for _ in range(30):
        out = q(x)
        used = (out.indices >= 0).all(dim=0)
        n = int(used.sum())
        assert used[:n].all() and not used[n:].any()  # a prefix of stages, the rest marked -1
        torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized, atol=1e-5, rtol=1e-5)
        active.add(n)
    assert len(active) >= 3
    q.eval()
    assert (q(x).indices >= 0).all()  # no dropout at inference
    with pytest.raises(ValueError, match="n_quantizers"):
        q(x, n_quantizers=5)


def test_grouped_residual_vq_indices_are_group_major():
    q = GroupedResidualVQ(dim=D, groups=2, num_quantizers=2, codebook_size=8, vq={"kmeans_init": True})
    x = torch.randn(64, D)
    q(x)
    q.eval()
    out = q(x)
    first = q.rvqs[0].indices_to_codes(out.indices[:, :2])
    second = q.rvqs[1].indices_to_codes(out.indices[:, 2:])
    torch.testing.assert_close(torch.cat([first, second], dim=1), out.quantized)
    assert q.bits_per_token == 4 * 3


def test_product_quantization_quantizes_each_slice_with_its_own_codebook():
    q = ProductQuantize(dim=D, num_subvectors=4, codebook_size=8, vq={"kmeans_init": True})
    x = torch.randn(128, D)
    q(x)
    q.eval()
    out = q(x)
    assert out.indices.shape == (128, 4) and q.bits_per_token == 12
    for m, sub in enumerate(q.quantizers):
        chunk = x[:, 2 * m : 2 * m + 2]
        nearest = torch.cdist(chunk, sub.codebook()).argmin(dim=1)
        torch.testing.assert_close(out.indices[:, m], nearest)
        torch.testing.assert_close(out.quantized[:, 2 * m : 2 * m + 2], sub.codebook()[nearest])


def test_quantizer_math_stays_fp32_under_autocast():
    # Codes 1e-3 apart: bf16 (spacing 2^-7 near 1) cannot tell them apart, fp32 can.
    q = VectorQuantize(dim=4, codebook_size=8)
    q.embed.copy_((1 + 1e-3 * torch.arange(8.0))[:, None].repeat(1, 4))
    q.eval()
    x = q.embed.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x)
        bf16_out = q(x.bfloat16())
    torch.testing.assert_close(out.indices, torch.arange(8))
    assert out.quantized.dtype == torch.float32 and bf16_out.quantized.dtype == torch.bfloat16
    # A bf16 input is quantized with fp32 math: same codes as the upcast input, output back in bf16.
    fsq = FSQ(levels=[8, 8, 8])
    z = torch.randn(4096, 3).bfloat16()
    out = fsq(z)
    assert out.quantized.dtype == torch.bfloat16
    torch.testing.assert_close(out.indices, fsq(z.float()).indices)


def test_same_seed_same_result():
    def run(seed):
        torch.manual_seed(seed)
        q = VectorQuantize(dim=D, codebook_size=32, dead_code_threshold=1.0, decay=0.8)
        x = torch.randn(256, D)
        for _ in range(5):
            out = q(x)
        return q.embed.clone(), out.indices

    a, b, c = run(3), run(3), run(4)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
