"""FSQ's optional code-usage entropy loss: exact value, finite gradients, and that it spreads usage."""

import itertools
import math

import pytest
import torch

from lowbit.vq import FSQ


def _entropy(p: torch.Tensor) -> float:
    return float(-torch.special.xlogy(p, p).sum())


def _brute_force(bounded: torch.Tensor, levels: list[int], temperature: float) -> tuple[float, float, float]:
    """(mean per-token entropy, exact codebook entropy, per-channel bound) by enumerating every code, in float64."""
    f64 = torch.float64
    codes = list(itertools.product(*[range(L) for L in levels]))
    n = bounded.shape[0]
    avg = torch.zeros(len(codes), dtype=f64)
    marginals = [torch.zeros(L, dtype=f64) for L in levels]
    per_token = 0.0
    for row in bounded.double():
        channel = []
        for i, L in enumerate(levels):
            w = torch.tensor([math.exp(-((float(row[i]) - k) ** 2) / temperature) for k in range(L)], dtype=f64)
            channel.append(w / w.sum())
            marginals[i] += channel[-1] / n
        joint = torch.tensor([math.prod(float(channel[i][c[i]]) for i in range(len(levels))) for c in codes], dtype=f64)
        per_token += _entropy(joint) / n
        avg += joint / n
    return per_token, _entropy(avg), sum(_entropy(m) for m in marginals)


@pytest.mark.parametrize(
    ("levels", "temperature"),
    [([3, 2, 4], 0.25), ([3, 2, 4], 1.0), ([5], 0.5), ([2, 3, 2, 2, 3], 0.1), ([4, 4], 0.1)],
)
def test_entropy_terms_match_brute_force(levels, temperature):
    # Unequal levels exercise the padding of the level grid; odd and even channel counts the two-half split.
    torch.manual_seed(1)
    z = torch.randn(7, len(levels)) * 1.5
    q = FSQ(levels=levels, entropy_weight=1.0, temperature=temperature)
    per_token, codebook = q.entropy_terms(q.bound(z))
    want_token, want_codebook, want_bound = _brute_force(q.bound(z), levels, temperature)
    assert float(per_token) == pytest.approx(want_token, rel=1e-5)
    assert float(codebook) == pytest.approx(want_codebook, rel=1e-5)
    # Above exact_entropy_max_codes: the per-channel bound, which is >= the exact joint entropy.
    big = FSQ(levels=levels, entropy_weight=1.0, temperature=temperature, exact_entropy_max_codes=math.prod(levels) - 1)
    per_token_big, bound = big.entropy_terms(big.bound(z))
    assert float(per_token_big) == pytest.approx(want_token, rel=1e-5)
    assert float(bound) == pytest.approx(want_bound, rel=1e-5)
    assert want_bound >= want_codebook - 1e-9


def test_layer_loss_is_the_weighted_difference_and_only_in_training():
    q = FSQ(levels=[4, 4], entropy_weight=0.3, diversity_gamma=2.0, temperature=0.5)
    z = torch.randn(64, 2)
    out = q(z)
    per_token, codebook = q.entropy_terms(q.bound(z))
    torch.testing.assert_close(out.loss, 0.3 * (per_token - 2.0 * codebook))
    torch.testing.assert_close(out.aux["per_sample_entropy"], per_token)
    torch.testing.assert_close(out.aux["codebook_entropy"], codebook)
    q.eval()
    assert float(q(z).loss) == 0.0 and q(z).aux == {}
    plain = FSQ(levels=[4, 4])  # the default is plain FSQ: no auxiliary loss at all
    assert plain.config.entropy_weight == 0.0
    assert float(plain(z).loss) == 0.0 and plain(z).aux == {}
    torch.testing.assert_close(plain(z).quantized, out.quantized)  # the loss never changes the codes


def test_lazy_entropy_loss_runs_every_kth_training_call_with_k_times_the_weight():
    # entropy_every=k: the loss is in calls 0, k, 2k, ... only, weighted by k, so over k training calls on the same
    # input the summed gradient is exactly the every-call one's; eval calls do not count.
    torch.manual_seed(0)
    z = torch.randn(128, 3)
    every = FSQ(levels=[4, 3, 5], entropy_weight=0.5, temperature=0.2)
    lazy = FSQ(levels=[4, 3, 5], entropy_weight=0.5, temperature=0.2, entropy_every=3)

    def summed_grad(q: FSQ, calls: int) -> tuple[torch.Tensor, list[float]]:
        x = z.clone().requires_grad_()
        losses = []
        for _ in range(calls):
            q.eval()
            q(x)  # an evaluation call in between: must not shift the schedule
            q.train()
            out = q(x)
            due = "codebook_entropy" in out.aux
            assert due == (out.loss.grad_fn is not None)
            if due:
                out.loss.backward()
            losses.append(float(out.loss.detach()))
        return x.grad, losses

    grad_every, losses_every = summed_grad(every, 3)
    grad_lazy, losses_lazy = summed_grad(lazy, 6)
    assert losses_lazy[1:3] == [0.0, 0.0] and losses_lazy[4:6] == [0.0, 0.0]
    assert losses_lazy[0] == pytest.approx(3 * losses_every[0], rel=1e-6)
    assert losses_lazy[3] == pytest.approx(losses_lazy[0], rel=1e-6)
    torch.testing.assert_close(grad_lazy, 2 * grad_every)  # 6 lazy calls = two loss terms of weight 3 = 6 eager ones


@pytest.mark.parametrize("exact_max", [4096, 0])
def test_loss_and_gradient_are_finite_and_nonzero(exact_max):
    # Unequal levels (padded grid), saturated tanh inputs, exact zeros and a one-token batch.
    q = FSQ(levels=[5, 2, 3, 8], entropy_weight=1.0, temperature=0.1, exact_entropy_max_codes=exact_max)
    for z in (torch.randn(256, 4) * 30, torch.zeros(3, 4), torch.randn(1, 4)):
        z = z.clone().requires_grad_()
        out = q(z)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert torch.isfinite(z.grad).all()
    z = torch.randn(256, 4).requires_grad_()
    q(z).loss.backward()
    assert (z.grad.abs().sum(0) > 0).all()  # every channel gets a gradient


def test_joint_codebook_term_penalises_correlated_channels():
    # Two channels that are individually uniform over their 4 levels but identical use only 4 of the 16 codes: the
    # per-channel bound cannot tell them from independent channels, the exact joint term can.
    torch.manual_seed(0)
    digit_a, digit_b = torch.randint(0, 4, (2, 4096)).float()
    independent = torch.stack([digit_a, digit_b], 1)
    correlated = torch.stack([digit_a, digit_a], 1)
    exact = FSQ(levels=[4, 4], entropy_weight=1.0, temperature=0.05)
    bound = FSQ(levels=[4, 4], entropy_weight=1.0, temperature=0.05, exact_entropy_max_codes=0)
    assert float(exact.entropy_terms(independent)[1]) == pytest.approx(math.log(16), rel=1e-2)
    assert float(exact.entropy_terms(correlated)[1]) == pytest.approx(math.log(4), rel=1e-2)
    assert float(bound.entropy_terms(correlated)[1]) == pytest.approx(math.log(16), rel=1e-2)


def test_descending_the_loss_decorrelates_a_collapsed_batch():
    # Start from the digits failure mode: channel 1 copies channel 0, so (up to the few tokens the 0.01 noise puts
    # across a bin edge) only the 4 "diagonal" codes of 16 occur. Gradient descent on the entropy loss alone must use
    # every code and move a real share of the batch off the diagonal; without the codebook term (diversity_gamma = 0)
    # nothing pulls the channels apart. Relative to the start, so no seed's count is built in: at seeds 0-15 the
    # start had 0.2-1.6% off the diagonal, gamma = 0 never added any, gamma = 1 added 14-20%.
    torch.manual_seed(0)
    base = torch.randn(512, 1) * 1.2
    start = torch.cat([base, base + 0.01 * torch.randn(512, 1)], 1)

    def counts_after(gamma: float) -> torch.Tensor:
        z = start.clone().requires_grad_()
        q = FSQ(levels=[4, 4], entropy_weight=1.0, diversity_gamma=gamma, temperature=0.25)
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(150):
            opt.zero_grad()
            q(z).loss.backward()
            opt.step()
        return torch.bincount(q(z.detach()).indices, minlength=16)

    def off_diagonal(counts: torch.Tensor) -> float:  # share of tokens whose two digits differ
        return 1 - float(counts[[0, 5, 10, 15]].sum()) / float(counts.sum())

    collapsed = off_diagonal(torch.bincount(FSQ(levels=[4, 4])(start).indices, minlength=16))
    assert collapsed < 0.05
    assert off_diagonal(counts_after(0.0)) <= collapsed
    spread = counts_after(1.0)
    assert (spread > 0).all()
    assert off_diagonal(spread) > collapsed + 0.1


def _reference_terms(bounded: torch.Tensor, levels: list[int], temperature: float):
    """Both terms by plain autograd-able torch ops over the full (N, K) joint: the definition, not the fast path."""
    channels = [
        torch.softmax(-((bounded[:, i : i + 1] - torch.arange(L, dtype=bounded.dtype)) ** 2) / temperature, dim=1)
        for i, L in enumerate(levels)
    ]
    joint = channels[-1]  # index order: the last channel is the most significant digit
    for p in reversed(channels[:-1]):
        joint = (joint[:, :, None] * p[:, None, :]).reshape(bounded.shape[0], -1)
    per_token = -torch.special.xlogy(joint, joint).sum(1).mean()
    avg = joint.mean(0)
    return per_token, -(avg * (avg + 1e-12).log()).sum()


@pytest.mark.parametrize("levels", [[4, 4, 4, 4], [3, 2, 4], [5], [2, 3, 2, 2, 3]])
def test_hand_written_backward_matches_autograd(levels):
    # The fast path's backward is written out by hand: it must give autograd's gradient of the definition, for
    # equal and padded levels and for odd channel counts (an empty or one-channel half).
    torch.manual_seed(2)
    q = FSQ(levels=levels, entropy_weight=1.0, temperature=0.3).double()
    z = (torch.randn(33, len(levels), dtype=torch.float64) * 1.5).requires_grad_()
    weights = (0.7, -1.3)  # arbitrary upstream gradients for the two outputs
    fast = q.entropy_terms(q.bound(z))
    (grad_fast,) = torch.autograd.grad(sum(w * t for w, t in zip(weights, fast)), z)
    ref = _reference_terms(q.bound(z), levels, 0.3)
    (grad_ref,) = torch.autograd.grad(sum(w * t for w, t in zip(weights, ref)), z)
    torch.testing.assert_close(torch.stack(fast), torch.stack(ref), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-7, atol=1e-10)
