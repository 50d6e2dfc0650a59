"""VectorQuantize: nearest-code lookup in a learned codebook (VQ-VAE, van den Oord et al. 2017).

Options: Euclidean or cosine distance; straight-through or rotation-trick gradients; commitment loss; EMA
codebook updates; k-means init; dead-code restarts from the batch; SimVQ (codebook = frozen basis @ learned W).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Quantizer, QuantizerResult, all_reduce_sum_, check, gradient_estimator
from .kmeans import assign, kmeans, sample_rows


@dataclass(frozen=True)
class VQConfig:
    dim: int
    codebook_size: int
    channel_dim: int = -1  # axis of the input that holds the ``dim`` channels
    distance: str = "euclidean"  # "euclidean" | "cosine" (codes and inputs l2-normalised, output on the sphere)
    gradient: str = "ste"  # "ste" (straight-through) | "rotation" (Fifty et al. 2024)
    commitment_weight: float = 0.25  # beta * |x - sg(q)|^2
    codebook_weight: float = 1.0  # |sg(x) - q|^2, only when the codebook is learned by gradient (ema=False)
    ema: bool = True  # codebook = EMA of assigned inputs (no codebook gradient)
    decay: float = 0.99  # EMA decay of codebook statistics and of the usage counts that spot dead codes
    eps: float = 1e-5  # Laplace smoothing of EMA cluster sizes
    kmeans_init: bool = False  # initialise codes with k-means on the first training batch
    kmeans_iters: int = 10
    init_scale: float = 1.0  # std of the random initial codebook (used when kmeans_init is off)
    dead_code_threshold: float = 0.0  # restart codes whose EMA usage (tokens per batch) falls below this; 0 = off
    simvq: bool = False  # SimVQ (Zhu et al. 2024): codes = frozen random basis @ learned linear map

    def __post_init__(self) -> None:
        check(isinstance(self.dim, int) and self.dim >= 1, "dim", f"must be a positive int, got {self.dim!r}")
        check(
            isinstance(self.codebook_size, int) and self.codebook_size >= 2,
            "codebook_size",
            f"must be an int >= 2, got {self.codebook_size!r}",
        )
        check(isinstance(self.channel_dim, int), "channel_dim", f"must be an int, got {self.channel_dim!r}")
        check(self.distance in ("euclidean", "cosine"), "distance", f"'euclidean' or 'cosine', got {self.distance!r}")
        check(self.gradient in ("ste", "rotation"), "gradient", f"'ste' or 'rotation', got {self.gradient!r}")
        check(self.commitment_weight >= 0, "commitment_weight", f"must be >= 0, got {self.commitment_weight}")
        check(self.codebook_weight >= 0, "codebook_weight", f"must be >= 0, got {self.codebook_weight}")
        check(0.0 < self.decay < 1.0, "decay", f"must be in (0, 1), got {self.decay}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.kmeans_iters >= 1, "kmeans_iters", f"must be >= 1, got {self.kmeans_iters}")
        check(self.init_scale > 0, "init_scale", f"must be > 0, got {self.init_scale}")
        check(self.dead_code_threshold >= 0, "dead_code_threshold", f"must be >= 0, got {self.dead_code_threshold}")
        check(
            not (self.simvq and self.ema),
            "simvq",
            "SimVQ learns its codebook through the linear map by gradient; set ema=False",
        )


def make_config(cls: type, config: Any, kwargs: dict[str, Any]) -> Any:
    """Accept either a config object or keyword arguments (or a config plus overrides)."""
    if config is None:
        return cls(**kwargs)
    if not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **kwargs) if kwargs else config


class VectorQuantize(Quantizer):
    """``VectorQuantize(dim=64, codebook_size=512, ...)`` or ``VectorQuantize(VQConfig(...))``."""

    def __init__(self, config: VQConfig | None = None, /, **kwargs: Any) -> None:
        super().__init__()
        cfg: VQConfig = make_config(VQConfig, config, kwargs)
        self.config = cfg
        self.dim, self.channel_dim = cfg.dim, cfg.channel_dim
        self.cosine = cfg.distance == "cosine"
        self._grad = gradient_estimator(cfg.gradient)
        k, d = cfg.codebook_size, cfg.dim
        init = torch.randn(k, d) * cfg.init_scale
        if self.cosine:
            init = F.normalize(init, dim=-1)
        if cfg.simvq:
            self.register_buffer("frozen_basis", init)
            self.project = nn.Linear(d, d, bias=False)
        elif cfg.ema:
            self.register_buffer("embed", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.embed = nn.Parameter(init)
        # EMA of tokens per code per batch: drives EMA updates and dead-code detection in every mode.
        self.register_buffer("cluster_size", torch.zeros(k))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size]

    def codebook(self) -> Tensor:
        """The effective (codebook_size, dim) codebook (normalised for cosine distance)."""
        c = self.project(self.frozen_basis) if self.config.simvq else self.embed
        return F.normalize(c, dim=-1) if self.cosine else c

    # ------------------------------------------------------------------ state changes (no grad)
    @torch.no_grad()
    def _set_codes(self, which: Tensor, codes: Tensor, size: Tensor | float) -> None:
        """Overwrite codes ``which`` and reset their EMA state to a consistent fresh start."""
        self.cluster_size[which] = size if isinstance(size, float) else size.to(self.cluster_size)
        if self.config.simvq:
            # Solve basis @ W^T = codes for the frozen basis rows; W stays as trained. Out of place: this step's
            # graph saved the old basis for W's gradient.
            basis = self.frozen_basis.clone()
            basis[which] = codes @ torch.linalg.pinv(self.project.weight.t().float())
            self.frozen_basis = basis
        elif self.config.ema:
            self.embed[which] = codes
            self.embed_sum[which] = codes * self.cluster_size[which][:, None]
        else:
            self.embed.data[which] = codes

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        k = self.config.codebook_size
        n = all_reduce_sum_(torch.tensor(float(x.shape[0]), device=x.device))
        everything = torch.arange(k, device=x.device)
        if self.config.kmeans_init:
            centroids, counts = kmeans(x, k, self.config.kmeans_iters, self.cosine)
            self._set_codes(everything, centroids, counts)
        else:
            # Uniform usage prior, so random codes get a grace period before they can be judged dead.
            self.cluster_size.fill_(float(n) / k)
            if self.config.ema:
                self.embed_sum.copy_(self.embed * self.cluster_size[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, x: Tensor, idx: Tensor) -> None:
        cfg = self.config
        counts = all_reduce_sum_(torch.bincount(idx, minlength=cfg.codebook_size).float())
        self.cluster_size.mul_(cfg.decay).add_(counts, alpha=1 - cfg.decay)
        if not cfg.ema:
            return
        sums = all_reduce_sum_(torch.zeros_like(self.embed).index_add_(0, idx, x))
        self.embed_sum.mul_(cfg.decay).add_(sums, alpha=1 - cfg.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + cfg.eps) / (n + cfg.codebook_size * cfg.eps) * n
        embed = self.embed_sum / smoothed[:, None]
        self.embed.copy_(F.normalize(embed, dim=-1) if self.cosine else embed)

    @torch.no_grad()
    def _restart_dead(self, x: Tensor) -> int:
        """Move codes whose usage fell below the threshold onto random batch vectors; returns how many."""
        # cluster_size is all-reduced, so every rank finds the same dead codes; sample_rows broadcasts rank 0's picks.
        dead = torch.nonzero(self.cluster_size < self.config.dead_code_threshold).flatten()
        if dead.numel() == 0:
            return 0
        # A restarted code gets the average usage: a grace period to attract data before it is judged again.
        fresh = float(self.cluster_size.mean().clamp_min(self.config.dead_code_threshold))
        self._set_codes(dead, sample_rows(x, dead.numel()), fresh)
        return int(dead.numel())

    # ------------------------------------------------------------------ forward
    def _quantize(self, x: Tensor, apply_gradient: bool = True) -> QuantizerResult:  # type: ignore[override]
        cfg = self.config
        if self.cosine:
            x = F.normalize(x, dim=-1)
        if self.training and not bool(self.initialized):
            self._initialize(x.detach())
        codebook = self.codebook()
        with torch.no_grad():
            idx = assign(x.detach(), codebook.detach(), self.cosine)
        codes = F.embedding(idx, codebook)  # carries gradient to a learned codebook / SimVQ map
        commitment = F.mse_loss(x, codes.detach())
        loss = cfg.commitment_weight * commitment
        aux: dict[str, Tensor] = {"commitment": commitment.detach()}
        if not cfg.ema:
            codebook_loss = F.mse_loss(codes, x.detach())
            loss = loss + cfg.codebook_weight * codebook_loss
            aux["codebook"] = codebook_loss.detach()
        if self.training:
            self._update(x.detach(), idx)
            if cfg.dead_code_threshold > 0:
                aux["restarted"] = torch.tensor(float(self._restart_dead(x.detach())))
        out = self._grad(x, codes) if apply_gradient else codes
        return QuantizerResult(out, idx, loss, aux)

    def _decode(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.codebook())
