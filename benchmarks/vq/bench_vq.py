"""Digits VQ-VAE benchmark: every lowbit.vq quantizer at 8 bits per token, side by side with the same configuration
built from vector-quantize-pytorch (optional peer; skipped with a note when it is not installed).

Per quantizer: test-set reconstruction MSE, code utilisation over the training set, median training-step time
(whole step: encoder, quantizer, decoder, backward, Adam) and median quantizer-only forward+backward time.
Ours and the peer train in lockstep (alternating which goes first), so machine load hits both alike.
``fsq+entropy`` is our FSQ with its code-usage entropy loss; the peer has no such option, so its peer columns are the
peer's plain FSQ.

    python benchmarks/vq/bench_vq.py --steps 1000 --threads 1 --out benchmarks/vq/results.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.vq.digits import (
    PRESETS,
    QUANTIZERS,
    DigitsConfig,
    DigitsTrainer,
    load_digits_split,
    make_quantizer,
    windowed_median_ms,
)


def _peer_module():
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        return None
    return vqp


class PeerAdapter(nn.Module):
    """Wrap a vector-quantize-pytorch layer so the digits model can use it: (B, C, H, W) in, channels last inside,
    returns (quantized, indices, loss) with indices (B, H*W[, codebooks])."""

    def __init__(self, layer: nn.Module, dim: int, codebook_sizes: list[int], **forward_kwargs: Any) -> None:
        super().__init__()
        self.layer, self.dim, self.codebook_sizes = layer, dim, codebook_sizes
        self.multi_codebook = len(codebook_sizes) > 1
        self.forward_kwargs = forward_kwargs

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, c, h, w = z.shape
        out = self.layer(z.permute(0, 2, 3, 1).reshape(b, h * w, c), **self.forward_kwargs)
        quantized, indices = out[0], out[1]
        loss = out[2].sum() if len(out) > 2 else z.new_zeros(())
        if indices.ndim == 4:  # grouped residual: (groups, B, N, num_quantizers) -> (B, N, groups * num_quantizers)
            indices = indices.permute(1, 2, 0, 3).reshape(b, h * w, -1)
        return quantized.reshape(b, h, w, c).permute(0, 3, 1, 2), indices, loss


def peer_factory(name: str) -> Callable[[], nn.Module] | None:
    """The vector-quantize-pytorch layer configured like our preset ``name`` (None when the peer is missing)."""
    vqp = _peer_module()
    if vqp is None:
        return None
    p = PRESETS[name]
    stage = p.get("vq", p)
    # Our VQ family: EMA codebook, k-means init, dead-code restarts, commitment 0.25, straight-through gradients.
    common = {
        "decay": stage.get("decay", 0.9),
        "kmeans_init": True,
        "kmeans_iters": 10,
        "threshold_ema_dead_code": stage.get("dead_code_threshold", 0.0),
        "commitment_weight": 0.25,
        "rotation_trick": False,
    }

    def build() -> nn.Module:
        if name == "vq":
            layer = vqp.VectorQuantize(dim=16, codebook_size=256, **common)
            return PeerAdapter(layer, 16, [256])
        if name == "rvq":
            layer = vqp.ResidualVQ(dim=16, num_quantizers=2, codebook_size=16, **common)
            return PeerAdapter(layer, 16, [16, 16])
        if name == "grvq":
            layer = vqp.GroupedResidualVQ(dim=16, groups=2, num_quantizers=2, codebook_size=4, **common)
            return PeerAdapter(layer, 16, [4] * 4)
        if name == "pq":
            layer = vqp.VectorQuantize(
                dim=16, codebook_size=16, heads=2, separate_codebook_per_head=True, codebook_dim=8, **common
            )
            return PeerAdapter(layer, 16, [16, 16])
        if name in ("fsq", "fsq+entropy"):  # preserve_symmetry: the same symmetric grid of 4 points as ours
            # The peer's FSQ has no entropy loss: for fsq+entropy the peer columns are its plain FSQ.
            return PeerAdapter(vqp.FSQ(levels=list(p["levels"]), preserve_symmetry=True), 4, [256])
        if name == "lfq":  # our temperature 1 == their inv_temperature 1 for +-1 codes
            layer = vqp.LFQ(
                dim=8, entropy_loss_weight=0.1, diversity_gamma=p["diversity_gamma"], commitment_loss_weight=0.25
            )
            return PeerAdapter(layer, 8, [256], inv_temperature=1.0)
        if name == "bsq":  # codes +-1/sqrt(8): our temperature 1 (in units of the code magnitude) == inv_temperature 8
            layer = vqp.LFQ(dim=8, entropy_loss_weight=0.1, commitment_loss_weight=0.25, spherical=True)
            return PeerAdapter(layer, 8, [256], inv_temperature=8.0)
        raise ValueError(name)

    return build


def layer_ms(module: nn.Module, channels: int, iters: int = 64, batch: int = 128) -> float:
    """Forward+backward time of the quantizer alone on a (batch, channels, 4, 4) input, training mode: the median over
    windows of 8 calls of their mean (as for whole steps)."""
    module.train()
    x = torch.randn(batch, channels, 4, 4, requires_grad=True)
    times = []
    for i in range(iters + 5):
        start = time.perf_counter()
        out = module(x)
        (out[0].square().mean() + out[2]).backward()
        if i >= 5:  # skip k-means init and warm-up
            times.append(time.perf_counter() - start)
        x.grad = None
    return windowed_median_ms(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    vqp = _peer_module()
    note = None if vqp is not None else "vector-quantize-pytorch is not installed: peer columns skipped"
    rows = []
    for name in args.quantizers:
        cfg = DigitsConfig(quantizer=name, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
        ours = DigitsTrainer(cfg, data=data)
        peer = DigitsTrainer(cfg, quantizer_factory=peer_factory(name), data=data) if vqp is not None else None
        t0 = time.perf_counter()
        for step in range(cfg.steps):
            pair = [ours] if peer is None else ([ours, peer] if step % 2 == 0 else [peer, ours])
            for trainer in pair:
                trainer.step()
        row: dict[str, Any] = {"quantizer": name, "bits_per_token": ours.model.quantizer.bits_per_token}
        for tag, trainer in (("ours", ours), ("peer", peer)):
            if trainer is None:
                continue
            m = trainer.evaluate()
            row[f"{tag}_test_mse"] = m["test_mse"]
            row[f"{tag}_utilization"] = m["utilization"]
            row[f"{tag}_step_ms"] = trainer.median_step_ms()
        torch.manual_seed(args.seed)
        row["ours_layer_ms"] = layer_ms(make_quantizer(name), ours.model.quantizer.dim)
        if vqp is not None:
            torch.manual_seed(args.seed)
            row["peer_layer_ms"] = layer_ms(peer_factory(name)(), ours.model.quantizer.dim)
        rows.append(row)
        print(f"{name}: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "torch": torch.__version__,
        "peer": importlib.metadata.version("vector-quantize-pytorch") if vqp is not None else None,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "note": note,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    peer = result["note"] is None
    head = ["quantizer", "bits/token", "MSE ours", "util ours"]
    if peer:
        head += ["MSE peer", "util peer"]
    head += ["step ms ours"]
    if peer:
        head += ["step ms peer", "step ours/peer", "layer ms ours", "layer ms peer"]
    else:
        head += ["layer ms ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [
            r["quantizer"],
            f"{r['bits_per_token']:.0f}",
            f"{r['ours_test_mse']:.4f}",
            f"{r['ours_utilization']:.1%}",
        ]
        if peer:
            cells += [f"{r['peer_test_mse']:.4f}", f"{r['peer_utilization']:.1%}"]
        cells += [f"{r['ours_step_ms']:.2f}"]
        if peer:
            ratio = r["ours_step_ms"] / r["peer_step_ms"]
            cells += [
                f"{r['peer_step_ms']:.2f}",
                f"{ratio:.2f}",
                f"{r['ours_layer_ms']:.2f}",
                f"{r['peer_layer_ms']:.2f}",
            ]
        else:
            cells += [f"{r['ours_layer_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if result["note"]:
        lines.append(f"\nNote: {result['note']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both implementations")
    p.add_argument("--quantizers", nargs="+", choices=QUANTIZERS, default=list(QUANTIZERS))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**result, "table": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
