"""FSQ's two grids: the published bound (``bound="paper"``) and lowbit's symmetric default.

The expected grids and derivatives are written out here from the paper's definition, not taken from the layer.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.vq import FSQ

LEVELS = [2, 3, 4, 5, 7, 8]
BOUNDS = ["paper", "symmetric"]
EPS = 1e-3  # the paper's


def paper_grid(L: int) -> list[float]:
    """Mentzer et al.: round(bounded) / (L // 2), bounded centred on 0 for odd L and on -1/2 for even L."""
    if L % 2:
        return [(k - (L - 1) / 2) / (L // 2) for k in range(L)]
    return [(k - L / 2) / (L / 2) for k in range(L)]


def symmetric_grid(L: int) -> list[float]:
    return [2 * k / (L - 1) - 1 for k in range(L)]


GRIDS = {"paper": paper_grid, "symmetric": symmetric_grid}


def derivative(bound: str, L: int, z: torch.Tensor) -> torch.Tensor:
    """d code / d z of the continuous bound, as the straight-through estimator should pass it on."""
    z = z.double()
    if bound == "symmetric":  # code = ((tanh(z) + 1) * L/2 - 0.5) / ((L-1)/2) - 1
        return (1 - torch.tanh(z) ** 2) * (L / 2) / ((L - 1) / 2)
    half_l = (L - 1) * (1 + EPS) / 2
    shift = math.atanh((0.5 if L % 2 == 0 else 0.0) / half_l)
    return (1 - torch.tanh(z + shift) ** 2) * half_l / (L // 2)  # code = (tanh(z + shift) * half_l - offset) / (L//2)


def sweep(n: int = 20001, reach: float = 12.0) -> torch.Tensor:
    """The same dense sweep of z on every channel, far enough out that tanh saturates in fp32."""
    return torch.linspace(-reach, reach, n)[:, None].expand(n, len(LEVELS)).contiguous()


@pytest.mark.parametrize("bound", BOUNDS)
def test_code_values_per_channel_are_the_grid(bound):
    q = FSQ(levels=LEVELS, bound=bound)
    codebook = q.indices_to_codes(torch.arange(q.codebook_size))
    assert codebook.shape == (math.prod(LEVELS), len(LEVELS))
    for i, L in enumerate(LEVELS):
        want = torch.tensor(GRIDS[bound](L))
        torch.testing.assert_close(codebook[:, i].unique(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bound", BOUNDS)
def test_every_grid_point_is_reached_and_decodes_back(bound):
    q = FSQ(levels=LEVELS, bound=bound)
    out = q(sweep())
    for i, L in enumerate(LEVELS):
        values = out.quantized[:, i]
        grid = torch.tensor(GRIDS[bound](L))
        nearest = (values[:, None] - grid).abs().min(dim=1)
        assert nearest.values.max() < 1e-6  # every output on the grid
        assert set(nearest.indices.tolist()) == set(range(L))  # and every grid point reached
        # Monotone: a larger z never gives a smaller code.
        assert (values.diff() >= -1e-6).all()
    torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.codes_to_indices(out.quantized), out.indices)
    all_codes = q.indices_to_codes(torch.arange(q.codebook_size))
    torch.testing.assert_close(q.codes_to_indices(all_codes), torch.arange(q.codebook_size))


@settings(max_examples=60, deadline=None)
@given(
    bound=st.sampled_from(BOUNDS),
    z=st.lists(st.floats(-60, 60, allow_nan=False, width=32), min_size=len(LEVELS), max_size=len(LEVELS)),
)
def test_any_input_quantizes_to_a_grid_point_that_round_trips(bound, z):
    q = FSQ(levels=LEVELS, bound=bound)
    x = torch.tensor([z])
    out = q(x)
    assert 0 <= int(out.indices) < q.codebook_size
    for i, L in enumerate(LEVELS):
        assert min(abs(float(out.quantized[0, i]) - g) for g in GRIDS[bound](L)) < 1e-6
    torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.codes_to_indices(out.quantized), out.indices)


@pytest.mark.parametrize("bound", BOUNDS)
def test_straight_through_gradient_is_the_bounds_derivative(bound):
    q = FSQ(levels=LEVELS, bound=bound)
    x = (torch.randn(256, len(LEVELS)) * 2).requires_grad_()
    g = torch.randn(256, len(LEVELS))
    (q(x).quantized * g).sum().backward()
    assert (x.grad[x.detach().abs() < 3] != 0).all()  # (beyond, the paper's L = 2 saturates in fp32: z + 3.8)
    for i, L in enumerate(LEVELS):
        want = g[:, i].double() * derivative(bound, L, x[:, i].detach())
        torch.testing.assert_close(x.grad[:, i].double(), want, atol=1e-6, rtol=1e-4)


def test_paper_bound_puts_zero_on_code_zero_and_splits_two_levels_off_centre():
    paper, symmetric = FSQ(levels=LEVELS, bound="paper"), FSQ(levels=LEVELS)
    assert (paper(torch.zeros(1, len(LEVELS))).quantized == 0).all()  # 0 is a code for every L
    zero = symmetric(torch.zeros(1, len(LEVELS))).quantized[0]
    assert [float(zero[i]) == 0 for i in range(len(LEVELS))] == [L % 2 == 1 for L in LEVELS]
    # L = 2: the paper's {-1, 0} split at z = -atanh(1 / (1 + eps)) ~ -3.8; the symmetric {-1, 1} split at 0.
    edge = -math.atanh(1 / (1 + EPS))
    two_paper, two_symmetric = FSQ(levels=[2], bound="paper"), FSQ(levels=[2])
    z = torch.tensor([[edge - 0.05], [edge + 0.05], [-0.05], [0.05]])
    assert two_paper(z).quantized.flatten().tolist() == [-1.0, 0.0, 0.0, 0.0]
    assert two_symmetric(z).quantized.flatten().tolist() == [-1.0, -1.0, -1.0, 1.0]


@pytest.mark.parametrize("bound", BOUNDS)
def test_entropy_loss_sees_the_same_levels_as_the_codes(bound):
    # The soft assignment's most likely level (the nearest integer to bound(z)) is the hard level of the index,
    # so the entropy loss spreads usage over the very codes the layer emits.
    q = FSQ(levels=LEVELS, bound=bound, entropy_weight=1.0)
    z = torch.randn(4096, len(LEVELS)) * 2
    out = q(z)
    basis = torch.cumprod(torch.tensor([1, *LEVELS[:-1]]), 0)
    digits = (out.indices[:, None] // basis) % torch.tensor(LEVELS)
    levels = torch.arange(max(LEVELS), dtype=torch.float32)
    nearest = (q.bound(z)[..., None] - levels).abs().masked_fill(levels >= torch.tensor(LEVELS)[:, None], 1e9)
    torch.testing.assert_close(nearest.argmin(-1), digits)
    assert torch.isfinite(out.loss) and out.aux["codebook_entropy"] > 0
    x = z.clone().requires_grad_()
    q(x).loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad.abs().sum(0) > 0).all()


@pytest.mark.optional
@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [4, 4, 4], [7, 6, 3]])
def test_paper_bound_matches_vector_quantize_pytorch(levels):
    peer_module = pytest.importorskip("vector_quantize_pytorch")
    ours, peer = FSQ(levels=levels, bound="paper"), peer_module.FSQ(levels=levels)
    # The peer takes (batch, tokens, channels) with channels last; its codes are on the same [-1, 1] scale and its
    # index has the same mixed radix (channel 0 least significant), only in int32.
    x = (torch.randn(4, 512, len(levels)) * 2).requires_grad_()
    y = x.detach().clone().requires_grad_()
    mine = ours(x)
    theirs, peer_indices = peer(y)
    assert torch.equal(mine.quantized, theirs)  # the same constants and operations: equal to the bit
    assert torch.equal(mine.indices, peer_indices.long())
    g = torch.randn_like(theirs)
    (mine.quantized * g).sum().backward()
    (theirs * g).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(ours.indices_to_codes(torch.arange(ours.codebook_size)), peer.implicit_codebook)
    # Images: the peer moves channels from axis 1 itself; ours is told with channel_dim=1.
    image = torch.randn(2, len(levels), 8, 8) * 2
    mine, (theirs, peer_indices) = FSQ(levels=levels, bound="paper", channel_dim=1)(image), peer(image)
    assert torch.equal(mine.quantized, theirs) and torch.equal(mine.indices, peer_indices.long())
