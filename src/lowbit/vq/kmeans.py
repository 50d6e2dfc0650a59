"""k-means for codebook initialisation, data-parallel aware.

Seeds (k-means++) are drawn on rank 0 and broadcast; per-iteration cluster sums and counts are all-reduced, so every rank
ends with the same centroids that a single process would compute on the concatenated batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import all_reduce_sum_, broadcast_


def sample_rows(x: Tensor, k: int) -> Tensor:
    """``k`` rows of ``x`` (without replacement when there are enough), identical on every rank."""
    n = x.shape[0]
    idx = torch.randperm(n, device=x.device)[:k] if n >= k else torch.randint(0, n, (k,), device=x.device)
    return broadcast_(x[idx].contiguous())


def assign(x: Tensor, centroids: Tensor, cosine: bool = False) -> Tensor:
    """Index of the nearest centroid per row (max dot product on the sphere, min squared distance otherwise)."""
    if cosine:
        return (x @ centroids.t()).argmax(dim=-1)
    # |x|^2 is constant per row, so it does not change the argmin.
    dist = centroids.pow(2).sum(-1)[None, :] - 2 * x @ centroids.t()
    return dist.argmin(dim=-1)


def kmeans_plus_plus(x: Tensor, k: int, cosine: bool = False) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new seed is drawn with probability proportional to its
    squared distance from the seeds so far, which avoids Lloyd's classic trap of two seeds in one cluster."""
    n = x.shape[0]
    if n <= k:  # not enough distinct rows to choose from: sample with replacement
        return sample_rows(x, k)
    seeds = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    seeds[0] = x[torch.randint(0, n, (1,), device=x.device)]
    nearest = torch.full((n,), float("inf"), device=x.device)
    for i in range(1, k):
        d = 1 - x @ seeds[i - 1] if cosine else (x - seeds[i - 1]).pow(2).sum(-1)
        nearest = torch.minimum(nearest, d.clamp_min(0))
        total = nearest.sum()
        pick = torch.multinomial(nearest / total, 1) if total > 0 else torch.randint(0, n, (1,), device=x.device)
        seeds[i] = x[pick]
    return broadcast_(seeds)  # seeded from rank 0's batch; Lloyd iterations below then use every rank's data


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 10, cosine: bool = False) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on rows of ``x`` (N, d). Returns ``(centroids (k, d), counts (k,))``.

    Empty clusters keep their previous centroid rather than collapsing to zero.
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans expects (N, d) rows, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k: need at least one cluster, got {k}")
    x = x.float()
    if cosine:
        x = F.normalize(x, dim=-1)
    centroids = kmeans_plus_plus(x, k, cosine)
    counts = torch.zeros(k, device=x.device)
    for _ in range(max(iters, 1)):
        idx = assign(x, centroids, cosine)
        counts = all_reduce_sum_(torch.bincount(idx, minlength=k).float())
        sums = all_reduce_sum_(torch.zeros_like(centroids).index_add_(0, idx, x))
        filled = counts > 0
        new = sums / counts.clamp_min(1)[:, None]
        if cosine:
            new = F.normalize(new, dim=-1)
        centroids = torch.where(filled[:, None], new, centroids)
    return centroids, counts
