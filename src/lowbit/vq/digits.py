"""A small convolutional VQ-VAE on scikit-learn's bundled 8x8 digits (no download).

Shared by the tests, the ``lowbit vq-train`` CLI and the benchmark: data loading, the model, a quantizer factory
with matched bits per token, a deterministic trainer, evaluation and the originals-vs-reconstructions figure.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Quantizer, check
from .fsq import FSQ
from .lfq import BSQ, LFQ
from .metrics import UsageMeter
from .product import ProductQuantize, ProductQuantizeConfig
from .residual import GroupedResidualVQ, GroupedResidualVQConfig, ResidualVQ, ResidualVQConfig
from .vector_quantize import VectorQuantize

QUANTIZERS = ("vq", "rvq", "grvq", "fsq", "fsq+entropy", "lfq", "bsq", "pq")
SPLIT_SEED = 1234  # the train/test split never changes with the training seed
TEST_SIZE = 297  # 1797 digits -> 1500 train / 297 test

# Every preset spends 8 bits per latent token (16 tokens per 8x8 image), so results compare at equal rate.
_VQ_FAMILY = {"kmeans_init": True, "dead_code_threshold": 1.0, "decay": 0.9}
PRESETS: dict[str, dict[str, Any]] = {
    "vq": {"dim": 16, "codebook_size": 256, **_VQ_FAMILY},
    "rvq": {"dim": 16, "num_quantizers": 2, "codebook_size": 16, "vq": dict(_VQ_FAMILY)},
    "grvq": {"dim": 16, "groups": 2, "num_quantizers": 2, "codebook_size": 4, "vq": dict(_VQ_FAMILY)},
    "pq": {"dim": 16, "num_subvectors": 2, "codebook_size": 16, "vq": dict(_VQ_FAMILY)},
    "fsq": {"levels": (4, 4, 4, 4)},  # plain FSQ (no auxiliary loss), on lowbit's default symmetric grid
    # FSQ plus the code-usage entropy loss. The weight is small because the entropy terms are in nats (up to
    # ln 256 = 5.5) while the pixel MSE they add to is ~0.005; larger weights reach 100% usage too but cost MSE.
    "fsq+entropy": {"levels": (4, 4, 4, 4), "entropy_weight": 0.002, "temperature": 0.1, "entropy_every": 4},
    # gamma=2: with gamma=1 the confident-bits term wins early and LFQ stalls near half the codebook on this data.
    "lfq": {"dim": 8, "entropy_weight": 0.1, "diversity_gamma": 2.0},
    "bsq": {"dim": 8, "entropy_weight": 0.1},
}
_CLASSES: dict[str, Any] = {
    "vq": VectorQuantize,
    "rvq": ResidualVQ,
    "grvq": GroupedResidualVQ,
    "pq": ProductQuantize,
    "fsq": FSQ,
    "fsq+entropy": FSQ,
    "lfq": LFQ,
    "bsq": BSQ,
}
_COMPOSITE_CONFIGS = {"rvq": ResidualVQConfig, "grvq": GroupedResidualVQConfig, "pq": ProductQuantizeConfig}


def make_quantizer(name: str, **overrides: Any) -> Quantizer:
    """The preset for ``name`` with channels on axis 1; overrides for composite layers that are not their own
    fields (e.g. ``dead_code_threshold`` for ``rvq``) go to every stage's VectorQuantize options."""
    check(name in PRESETS, "quantizer", f"must be one of {', '.join(QUANTIZERS)}, got {name!r}")
    kwargs = {**PRESETS[name], "channel_dim": 1}
    if name in _COMPOSITE_CONFIGS:
        own = {f.name for f in fields(_COMPOSITE_CONFIGS[name])}
        kwargs["vq"] = {**kwargs.get("vq", {}), **{k: v for k, v in overrides.items() if k not in own}}
        overrides = {k: v for k, v in overrides.items() if k in own}
    return _CLASSES[name](**{**kwargs, **overrides})


def load_digits_split(device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """(train, test) images of shape (N, 1, 8, 8) in [0, 1], split with a fixed seed."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return images[order[TEST_SIZE:]].to(device), images[order[:TEST_SIZE]].to(device)


class DigitsVQVAE(nn.Module):
    """8x8 -> 4x4 latent grid with ``quantizer.dim`` channels -> 8x8; about 22k parameters at hidden=16."""

    def __init__(self, quantizer: nn.Module, hidden: int = 16) -> None:
        super().__init__()
        d, h = quantizer.dim, hidden
        self.encoder = nn.Sequential(
            nn.Conv2d(1, h, 3, padding=1), nn.ReLU(), nn.Conv2d(h, 2 * h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * h, d, 1),
        )  # fmt: skip
        self.quantizer = quantizer
        self.decoder = nn.Sequential(
            nn.Conv2d(d, 2 * h, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(2 * h, h, 4, stride=2, padding=1),
            nn.ReLU(), nn.Conv2d(h, 1, 3, padding=1), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x: Tensor) -> tuple[Tensor, Any]:
        out = self.quantizer(self.encoder(x))
        return self.decoder(out[0]), out


@dataclass(frozen=True)
class DigitsConfig:
    quantizer: str = "vq"
    steps: int = 400
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0
    hidden: int = 16
    overrides: dict[str, Any] = field(default_factory=dict)  # quantizer options on top of the preset

    def __post_init__(self) -> None:
        check(
            self.quantizer in QUANTIZERS, "quantizer", f"must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}"
        )
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.hidden >= 1, "hidden", f"must be >= 1, got {self.hidden}")


class DigitsTrainer:
    """Trains one model step by step with its own RNG stream, so two trainers can run interleaved (as in the
    benchmark) and each still gives exactly what it gives alone under the same seed."""

    def __init__(
        self,
        config: DigitsConfig,
        quantizer_factory: Callable[[], nn.Module] | None = None,
        data: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.config = config
        self.train_x, self.test_x = data if data is not None else load_digits_split()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            factory = quantizer_factory or (lambda: make_quantizer(config.quantizer, **config.overrides))
            self.model = DigitsVQVAE(factory(), config.hidden)
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
            self._rng = torch.get_rng_state()
        self.step_times: list[float] = []
        self._order: Tensor | None = None
        self._pos = 0

    def _batch(self) -> Tensor:
        n, b = len(self.train_x), min(self.config.batch_size, len(self.train_x))
        if self._order is None or self._pos + b > n:  # reshuffle every epoch, drop the ragged tail
            self._order, self._pos = torch.randperm(n), 0
        idx = self._order[self._pos : self._pos + b]
        self._pos += b
        return self.train_x[idx]

    def step(self) -> dict[str, float]:
        self.model.train()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng)
            x = self._batch()
            start = time.perf_counter()
            recon, out = self.model(x)
            recon_loss = F.mse_loss(recon, x)
            loss = recon_loss + out[2]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step_times.append(time.perf_counter() - start)
            self._rng = torch.get_rng_state()
        losses = {
            "loss": float(loss.detach()),
            "recon_mse": float(recon_loss.detach()),
            "aux_loss": float(out[2].detach()),
        }
        if not math.isfinite(losses["loss"]):
            raise RuntimeError(f"training diverged at step {len(self.step_times)} (loss={losses['loss']})")
        return losses

    @torch.no_grad()
    def evaluate(self, chunk: int = 512) -> dict[str, float]:
        """Test-set reconstruction MSE; code usage over the whole training set."""
        self.model.eval()
        q = self.model.quantizer
        meter = UsageMeter(q.codebook_sizes, getattr(q, "multi_codebook", len(q.codebook_sizes) > 1))
        train_se = 0.0
        for part in self.train_x.split(chunk):
            recon, out = self.model(part)
            train_se += float(F.mse_loss(recon, part, reduction="sum"))
            meter.update(out[1])
        test_se = sum(float(F.mse_loss(self.model(p)[0], p, reduction="sum")) for p in self.test_x.split(chunk))
        return {
            "test_mse": test_se / self.test_x.numel(),
            "train_mse": train_se / self.train_x.numel(),
            "utilization": meter.utilization(),
            "perplexity": meter.perplexity(),
            "entropy_bits": meter.entropy_bits(),
            "bits_per_token": meter.nominal_bits(),
        }

    def median_step_ms(self, skip: int = 10, window: int = 8) -> float:
        """Median over consecutive windows of ``window`` steps of their mean step time, after ``skip`` warm-up steps.

        Windows, not single steps: a quantizer whose work varies from step to step (FSQ's lazy entropy loss runs on
        every k-th step) is charged its average cost, while a window hit by another process's burst is still ignored.
        """
        return windowed_median_ms(self.step_times[skip:] if len(self.step_times) > skip else self.step_times, window)


def windowed_median_ms(times: list[float], window: int = 8) -> float:
    """Median of the means of consecutive ``window``-long runs of ``times`` (seconds), in milliseconds."""
    window = max(1, min(window, len(times)))
    means = [statistics.fmean(times[i : i + window]) for i in range(0, len(times) - window + 1, window)]
    return 1000 * statistics.median(means)


def train_digits(
    config: DigitsConfig,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    data: tuple[Tensor, Tensor] | None = None,
) -> tuple[DigitsTrainer, dict[str, Any]]:
    """Train for ``config.steps`` steps and evaluate; ``progress(step, losses)`` is called after every step."""
    trainer = DigitsTrainer(config, data=data)
    last: dict[str, float] = {}
    for i in range(config.steps):
        last = trainer.step()
        if progress is not None:
            progress(i + 1, last)
    metrics = {**asdict(config), **trainer.evaluate(), "final_loss": last["loss"], "step_ms": trainer.median_step_ms()}
    return trainer, metrics


@torch.no_grad()
def save_reconstructions(model: DigitsVQVAE, images: Tensor, path: str | Path, n: int = 12) -> Path:
    """PNG of originals (top row) vs reconstructions (bottom row); written to a temp file, then renamed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    model.eval()
    images = images[:n]
    recon = model(images)[0]
    fig = Figure(figsize=(n * 0.8, 1.8))
    FigureCanvasAgg(fig)  # the Agg canvas: no display needed and no global pyplot backend switch
    for row, (title, batch) in enumerate((("original", images), ("reconstruction", recon))):
        for i in range(len(batch)):
            ax = fig.add_subplot(2, len(batch), row * len(batch) + i + 1)
            ax.imshow(batch[i, 0].cpu().numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=7, loc="left")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        tmp.replace(path)
    except BaseException:  # a full disk or Ctrl-C leaves no stray temp file
        tmp.unlink(missing_ok=True)
        raise
    return path
