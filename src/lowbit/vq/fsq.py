"""Finite scalar quantization (Mentzer et al. 2023): round each channel to a fixed grid, no codebook to learn.

Channel i is bounded with tanh to L_i levels and rounded; the implicit codebook is the product grid of prod(L_i)
points in [-1, 1]. Two bounds, i.e. two grids and their bins (``bound``):

- ``"symmetric"``, the default, is lowbit's variant: the L levels evenly spaced over [-1, 1] and symmetric about 0
  (level k of 0..L-1 is the code 2k/(L-1) - 1), with bins of equal width in tanh space.
- ``"paper"`` is the published bound (the paper's Appendix A.1): ``tanh(z + shift) * half_l - offset``, rounded,
  divided by ``L // 2``, with ``half_l = (L-1)(1+eps)/2``, ``offset = 1/2`` for even L (0 for odd), ``shift =
  atanh(offset / half_l)``, eps = 1e-3. The codes are (k - L//2) / (L//2): for odd L the default's points, for
  even L an asymmetric grid with 0 on it and one more level below 0 than above (L = 4: -1, -0.5, 0, 0.5). The bins
  differ for every L: here the two end levels get half-width bins (in tanh space). The listing in the paper writes
  ``(1 - eps)`` and ``tan(offset / half_l)``; the shift is there to put z = 0 on code 0, which atanh does exactly,
  and with ``(1 - eps)`` atanh is undefined at L = 2. Like vector-quantize-pytorch (whose FSQ gives the same
  outputs, to the bit) we use ``(1 + eps)`` and atanh: the same grid, bin edges within 0.01 in z of the listing's
  for L >= 3 (L = 2: the edge at z = -3.8 instead of -1.56).

The default differs from the paper because the even-L grid is lopsided: at L = 2 the codes are {-1, 0} and the edge
between them sits at z = -3.8, so -1 needs a saturated input and a 2-level channel carries almost nothing (the
peer refuses L = 2 without its symmetric mode); the symmetric grid treats every L >= 2 alike and splits L = 2 at
z = 0. Its cost: for even L no code is 0 (z = 0 lies on a bin edge). Indices are the mixed-radix number of the
levels k in both cases, and the entropy loss below sees the bounded value in the same level units.

Plain FSQ (``entropy_weight=0``, the default) has no auxiliary loss: every grid point is reachable by
construction, but nothing makes the encoder *use* them all. When latent channels come out correlated, whole
combinations of levels never occur (on the digits VQ-VAE two channels lock together and half the codebook stays
unused at some seeds).

Optional code-usage entropy loss (``entropy_weight > 0``, off by default), the same form as LFQ's: per token, each
channel gets a soft distribution over its levels, q_i(k | z) ~ exp(-(b_i - k)^2 / temperature), b_i the bounded
value in level units (grid step 1, so one temperature means the same softness for every L_i). The token's
distribution over the whole codebook is the product of its channels' distributions. The loss is

    entropy_weight * (mean_n H(q(. | z_n)) - diversity_gamma * H(mean_n q(. | z_n)))

The first term (minimised) asks for confident assignments; the second (maximised) for a batch-average that spreads
over every code. Because the average is taken over the *joint* distribution, the second term is maximal only when
the channels are independent as well as individually uniform, so it penalises exactly the correlated-channel
collapse above. The per-token entropy is exact and cheap (a product distribution's entropy is the sum of its
channels'). The joint average needs prod(L_i) numbers per token; up to ``exact_entropy_max_codes`` codes it is
computed exactly, above that the codebook term falls back to the sum of the per-channel entropies of the averaged
marginals, an upper bound on the joint entropy that still spreads each channel's levels but no longer sees
correlations between channels. As in LFQ, the batch average is over the tokens of this call (this rank's batch
under data parallelism). ``entropy_every=k`` computes the loss lazily, on every k-th training call with k times the
weight (the same expected gradient at 1/k of the cost, as StyleGAN2 does for its regularisers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .base import Quantizer, QuantizerResult, check, straight_through
from .vector_quantize import make_config

# The paper's eps: half_l a little above (L-1)/2, so that atanh(offset / half_l), the shift, is finite at L = 2.
_PAPER_EPS = 1e-3


@dataclass(frozen=True)
class FSQConfig:
    levels: tuple[int, ...]
    dim: int | None = None  # optional cross-check: must equal len(levels)
    channel_dim: int = -1
    # "symmetric": lowbit's grid, evenly spaced and symmetric about 0 for every L; "paper": the published bound and
    # grid (asymmetric for even L, 0 always on it). See the module docstring.
    bound: Literal["symmetric", "paper"] = "symmetric"
    # Code-usage entropy loss (see the module docstring); 0 = plain FSQ (no auxiliary loss, as published).
    entropy_weight: float = 0.0
    diversity_gamma: float = 1.0  # weight of the codebook-entropy (usage spreading) term inside the entropy loss
    # Softness of the level assignment, in squared level steps: at 0.1 a token on a grid point gives its neighbours
    # weight e^-10, one halfway between two levels splits 50/50. 1.0 was too soft on the digits VQ-VAE.
    temperature: float = 0.1
    exact_entropy_max_codes: int = 4096  # above this many codes the codebook term uses the per-channel bound
    # Lazy regularisation (as StyleGAN2 does for its regularisers): compute the loss on every k-th training call only,
    # weighted by k, so its gradient has the same expected size at 1/k of the cost. 1 = every call.
    entropy_every: int = 1

    def __post_init__(self) -> None:
        check(len(self.levels) >= 1, "levels", "need at least one level count")
        check(
            all(isinstance(v, int) and v >= 2 for v in self.levels),
            "levels",
            f"every entry must be an int >= 2, got {list(self.levels)}",
        )
        check(
            self.dim is None or self.dim == len(self.levels),
            "dim",
            f"FSQ quantizes one channel per level: dim={self.dim} but len(levels)={len(self.levels)}",
        )
        check(self.bound in ("symmetric", "paper"), "bound", f"'symmetric' or 'paper', got {self.bound!r}")
        check(self.entropy_weight >= 0, "entropy_weight", f"must be >= 0, got {self.entropy_weight}")
        check(self.diversity_gamma >= 0, "diversity_gamma", f"must be >= 0, got {self.diversity_gamma}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(
            isinstance(self.exact_entropy_max_codes, int) and self.exact_entropy_max_codes >= 0,
            "exact_entropy_max_codes",
            f"must be an int >= 0, got {self.exact_entropy_max_codes!r}",
        )
        check(
            isinstance(self.entropy_every, int) and self.entropy_every >= 1,
            "entropy_every",
            f"must be an int >= 1, got {self.entropy_every!r}",
        )
        object.__setattr__(self, "levels", tuple(self.levels))


class FSQ(Quantizer):
    """``FSQ(levels=[8, 5, 5, 5])``: 1000 codes on 4 channels; index = mixed-radix number of the per-channel digits.

    ``FSQ(levels=[8, 5, 5, 5], bound="paper")`` uses the published grid instead of lowbit's symmetric one.

    ``FSQ(levels=[4, 4, 4, 4], entropy_weight=0.002)`` adds the code-usage entropy loss to ``forward(...).loss`` in
    training mode (``aux``: ``per_sample_entropy``, ``codebook_entropy``); the codes themselves are unchanged. With
    ``entropy_every=k`` the loss (weighted by k) is only in every k-th training call's output, the rest carry zero.
    """

    def __init__(self, config: FSQConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__()
        if "levels" in kwargs:
            kwargs["levels"] = tuple(kwargs["levels"])
        cfg: FSQConfig = make_config(FSQConfig, config, kwargs)
        self.config = cfg
        self.dim, self.channel_dim = len(cfg.levels), cfg.channel_dim
        levels = torch.tensor(cfg.levels, dtype=torch.long)
        self.register_buffer("levels", levels, persistent=False)
        basis = torch.cumprod(torch.tensor([1, *cfg.levels[:-1]], dtype=torch.long), dim=0)
        self.register_buffer("basis", basis, persistent=False)
        # fp32 constants, precomputed: at token counts typical of a tokenizer, per-op overhead dominates FSQ.
        self.register_buffer("half_levels", levels.float() / 2, persistent=False)
        self.register_buffer("max_digit", (levels - 1).float(), persistent=False)
        # Code = digit / half_width - 1 in both grids: half_width = (L-1)/2 spreads the digits 0..L-1 over [-1, 1]
        # (symmetric), L//2 puts digit L//2 on 0 (paper).
        self.paper = cfg.bound == "paper"
        width = (levels // 2).float() if self.paper else (levels - 1).float() / 2
        self.register_buffer("half_width", width, persistent=False)
        # The paper's constants, in fp32 and in the same order of operations as the published code (and the peer's),
        # so bin edges agree to the last bit.
        half_l = (levels - 1) * (1 + _PAPER_EPS) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        self.register_buffer("paper_half_l", half_l, persistent=False)
        self.register_buffer("paper_offset", offset, persistent=False)
        self.register_buffer("paper_shift", torch.atanh(offset / half_l), persistent=False)
        # Entropy loss: level positions 0..L_i-1 as a (max L, dim, 1) grid; levels past L_i are padding.
        top = max(cfg.levels)
        grid = torch.arange(top, dtype=torch.float32)[:, None, None].expand(top, self.dim, 1)
        self.register_buffer("level_grid", grid.clone(), persistent=False)
        self.register_buffer("level_pad", grid >= levels[None, :, None].float(), persistent=False)
        self.padded_levels = len(set(cfg.levels)) > 1
        self._training_calls = 0  # counts calls with the entropy loss on, for entropy_every

    @property
    def codebook_sizes(self) -> list[int]:
        return [math.prod(self.config.levels)]

    def bound(self, z: Tensor) -> Tensor:
        """Squash channel i into level units, about (-0.5, L_i - 0.5) (symmetric) or (0, L_i - 1) (paper): rounding
        gives the level 0..L_i-1.

        ``bound="symmetric"`` (the default, not the paper's): ``(tanh(z) + 1) * L/2 - 0.5``, L equal-width bins in
        tanh space whose codes are symmetric about 0 for every L. The paper's even-L bound is lopsided (L = 2 gives
        codes {-1, 0} split at z = -3.8, so -1 is almost unreachable); this one splits L = 2 at z = 0, at the price
        of having no zero code for even L. ``bound="paper"``: the published ``tanh(z + shift) * half_l - offset``
        (see the module docstring), shifted by ``L // 2`` into level units.
        """
        if self.paper:
            return self._paper_centered(z) + self.half_width
        return (torch.tanh(z) + 1) * self.half_levels - 0.5

    def _paper_centered(self, z: Tensor) -> Tensor:
        """The paper's bound itself: rounds to the signed level k - L//2."""
        return torch.tanh(z + self.paper_shift) * self.paper_half_l - self.paper_offset

    def _bound_and_round(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(bound(z), its level 0..L-1 as a float)."""
        if self.paper:
            # Round the paper's own value, not bound(z): adding L//2 first could move a value within an ulp of a
            # bin edge across it (and round-half-even breaks ties differently), so indices would not match the paper.
            centered = self._paper_centered(z)
            bounded, digits = centered + self.half_width, centered.round() + self.half_width
        else:
            bounded = self.bound(z)
            digits = bounded.round()
        # Clamp: in the symmetric bound tanh saturates to exactly +-1 in fp32 and round(L - 0.5) would step off the
        # grid; in the paper's, eps does for L above about 1000.
        return bounded, digits.clamp_(min=0).minimum(self.max_digit)

    def entropy_terms(self, bounded: Tensor) -> tuple[Tensor, Tensor]:
        """(mean per-token entropy, entropy of the batch-averaged code distribution), both in nats.

        ``bounded`` is ``bound(z)``, (N, dim) in level units. The codebook term is exact up to
        ``exact_entropy_max_codes`` codes (the averaged joint over all prod(L_i) codes) and the per-channel upper
        bound above that (see the module docstring).
        """
        pad = self.level_pad if self.padded_levels else None
        if self.codebook_size <= self.config.exact_entropy_max_codes:
            return _ExactEntropy.apply(bounded, self.level_grid, pad, self.config.temperature, self.config.levels)
        _, p, log_p = _level_probs(bounded, self.level_grid, pad, self.config.temperature)
        per_token = -(p * log_p).sum() / bounded.shape[0]  # entropy of a product = sum of the channels' entropies
        marginal = p.mean(-1)  # (max L, dim), padding rows are 0
        return per_token, -(marginal * (marginal + 1e-12).log()).sum()

    def _quantize(self, x: Tensor) -> QuantizerResult:  # type: ignore[override]
        cfg = self.config
        bounded, digits = self._bound_and_round(x)
        codes = self._digits_to_codes(straight_through(bounded, digits))
        indices = (digits.long() * self.basis).sum(dim=-1)
        loss, aux = x.new_zeros(()), {}
        if cfg.entropy_weight > 0 and self.training and self._entropy_due():
            per_token, codebook = self.entropy_terms(bounded)
            loss = (cfg.entropy_weight * cfg.entropy_every) * (per_token - cfg.diversity_gamma * codebook)
            aux = {"per_sample_entropy": per_token.detach(), "codebook_entropy": codebook.detach()}
        return QuantizerResult(codes, indices, loss, aux)

    def _entropy_due(self) -> bool:
        """Whether this training call computes the entropy loss (the first call, then every ``entropy_every``-th)."""
        calls = self._training_calls
        self._training_calls = calls + 1
        return calls % self.config.entropy_every == 0

    def _digits_to_codes(self, digits: Tensor) -> Tensor:
        """Level 0..L-1 -> grid point in [-1, 1] (the paper's even L: [-1, 1 - 2/L])."""
        if self.paper:
            # The paper's round(bounded) / (L // 2), to the bit: digits - L//2 is that integer, exactly.
            return (digits - self.half_width) / self.half_width
        return digits / self.half_width - 1

    def _decode(self, indices: Tensor) -> Tensor:
        digits = (indices[:, None] // self.basis) % self.levels
        return self._digits_to_codes(digits.float())

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Inverse of ``indices_to_codes`` for codes with channels last."""
        digits = ((codes + 1) * self.half_width).round().long()
        return (digits * self.basis).sum(dim=-1)


_EPS = 1e-12  # inside the codebook term's log: codes no token reaches have an averaged probability of exactly 0


# Logits below this are clamped: on CPU, exp of anything under about -87 (a subnormal or zero result) leaves the
# vectorised fast path and costs ~10x, and at temperature 0.1 most levels of most tokens are far below. A level this
# far off gets probability < 2e-35 instead of something smaller, which changes no sum in fp32.
_MIN_LOGIT = -80.0


def _level_probs(
    bounded: Tensor, grid: Tensor, pad: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(b - k, q(k | z), log q(k | z)), each (max L, dim, N): per channel i a softmax over its levels k of
    -(b_i - k)^2 / temperature.

    Levels first: the reductions over a handful of levels then run across contiguous rows, several times faster on CPU
    than over a short last axis. Levels beyond L_i (channels with different L) get probability exactly 0.
    """
    diff = bounded.t().contiguous() - grid
    logits = diff.square().mul_(-1.0 / temperature).clamp_(min=_MIN_LOGIT)
    if pad is not None:
        # Padding joins the normaliser with weight e^-80 (nothing, in fp32) and is then zeroed exactly.
        logits = logits.masked_fill(pad, _MIN_LOGIT)
    log_p = logits.log_softmax(dim=0)
    p = log_p.exp()
    if pad is not None:
        p = p.masked_fill(pad, 0.0)
    return diff, p, log_p


def _halves(dim: int) -> tuple[list[int], list[int]]:
    """Channels of the high and low half of the code index, most significant first."""
    half = dim // 2
    return list(range(dim - 1, half - 1, -1)), list(range(half - 1, -1, -1))


def _outer(p: Tensor, levels: tuple[int, ...], channels: list[int]) -> Tensor:
    """(prod L_i, N): per-token outer product of the channels' level distributions, first channel most significant."""
    if not channels:
        return p.new_ones(1, p.shape[-1])
    joint = p[: levels[channels[0]], channels[0]]
    for i in channels[1:]:  # a loop over channels, not tokens
        joint = (joint[:, None, :] * p[: levels[i], i][None]).reshape(-1, p.shape[-1])
    return joint


def _outer_backward(grad: Tensor, p: Tensor, levels: tuple[int, ...], channels: list[int], out: Tensor) -> None:
    """Add d(loss)/d p[:, i] for the channels of one ``_outer`` product to ``out``, given d(loss)/d(product)."""
    n = p.shape[-1]
    shape = [levels[i] for i in channels]
    grad = grad.reshape(*shape, n)
    for pos, i in enumerate(channels):
        g = grad
        # Contract every other channel's distribution away, last axis first: the axes before it keep their numbers.
        for other in range(len(channels) - 1, -1, -1):
            if other != pos:
                j = channels[other]
                view = [1] * g.dim()
                view[other], view[-1] = levels[j], n
                g = (g * p[: levels[j], j].reshape(view)).sum(dim=other)
        out[: levels[i], i] += g


class _ExactEntropy(torch.autograd.Function):
    """Both entropy terms with the exact codebook term, forward and backward written out by hand.

    The same mathematics as composing the torch ops, but at tokenizer batch sizes (a few thousand tokens, a handful
    of levels) the cost is per-op overhead, and autograd's graph of ~30 small ops was 3x the quantizer itself. The
    backward reuses the forward's intermediates: for the codebook term, the gradient of the averaged joint with
    respect to one half's outer product is one matmul with the other half.
    """

    @staticmethod
    def forward(ctx, bounded, grid, pad, temperature, levels):  # type: ignore[override]
        diff, p, log_p = _level_probs(bounded, grid, pad, temperature)
        n = bounded.shape[0]
        per_token = -torch.dot(p.view(-1), log_p.view(-1)) / n  # entropy of a product = sum of the channels' entropies
        # mean_n q(code | z_n) in index order (channel 0 least significant): the channels split in two halves, each
        # half's per-token joint is an outer product, the average over tokens one matmul between the halves, so
        # intermediates are (sqrt(K), N), never (K, N).
        high_channels, low_channels = _halves(bounded.shape[1])
        high, low = _outer(p, levels, high_channels), _outer(p, levels, low_channels)
        avg = (high @ low.t()) / n
        log_avg = (avg + _EPS).log()
        codebook = -torch.dot(avg.view(-1), log_avg.view(-1))
        ctx.save_for_backward(diff, p, log_p, high, low, avg, log_avg)
        ctx.temperature, ctx.levels = temperature, levels
        return per_token, codebook

    @staticmethod
    def backward(ctx, grad_token, grad_codebook):  # type: ignore[override]
        diff, p, log_p, high, low, avg, log_avg = ctx.saved_tensors
        levels, n = ctx.levels, p.shape[-1]
        # d per_token / d p = -(log p + 1) / N
        grad_p = (log_p + 1).mul_(-grad_token / n)
        # d codebook / d avg = -(log(avg + eps) + avg / (avg + eps)); avg = high @ low^T / N
        grad_sum = (log_avg + avg / (avg + _EPS)) * (-grad_codebook / n)
        high_channels, low_channels = _halves(p.shape[1])
        _outer_backward(grad_sum @ low, p, levels, high_channels, grad_p)
        _outer_backward(grad_sum.t() @ high, p, levels, low_channels, grad_p)
        # Softmax over levels, then logits = -(b - k)^2 / T.
        grad_logits = (grad_p - (grad_p * p).sum(dim=0, keepdim=True)).mul_(p)
        grad_bounded = grad_logits.mul_(diff).sum(dim=0).t().mul(-2.0 / ctx.temperature)
        return grad_bounded, None, None, None, None
