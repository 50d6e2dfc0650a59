"""``lowbit vq-train``: train the 8x8-digits VQ-VAE example with one quantizer type.

Writes ``reconstructions.png`` (originals vs reconstructions) and ``metrics.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

QUANTIZER_CHOICES = ("vq", "rvq", "grvq", "fsq", "fsq+entropy", "lfq", "bsq", "pq")  # = lowbit.vq.digits.QUANTIZERS


def add_parser(sub) -> None:
    p = sub.add_parser("vq-train", help="train the digits VQ-VAE example", description=__doc__)
    p.add_argument(
        "--quantizer", choices=QUANTIZER_CHOICES, default="vq", help="quantizer type, 8 bits per token (default: vq)"
    )
    p.add_argument("--steps", type=int, default=400, help="training steps (default: 400)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 0.003)")
    p.add_argument("--hidden", type=int, default=16, help="conv width of the encoder/decoder (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="directory for reconstructions.png and metrics.json")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(run=run)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from ..vq.digits import DigitsConfig, save_reconstructions, train_digits

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")
    try:
        config = DigitsConfig(
            quantizer=args.quantizer, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            hidden=args.hidden,
        )  # fmt: skip
    except ValueError as exc:  # "batch_size: must be >= 1" -> "--batch-size: must be >= 1"
        field, _, message = str(exc).partition(": ")
        raise ValueError(f"--{field.replace('_', '-')}: {message}") from None

    err = Console(stderr=True)
    columns = (TextColumn(f"vq-train {args.quantizer}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("train", total=config.steps, info="")

        def report(step: int, losses: dict[str, float]) -> None:
            progress.update(task, completed=step, info=f"mse {losses['recon_mse']:.4f}")

        trainer, metrics = train_digits(config, progress=report)

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        png = save_reconstructions(trainer.model, trainer.test_x, args.out / "reconstructions.png")
        metrics["png"] = str(png)
        _write_atomic(args.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    table = Table(title=f"digits VQ-VAE, {args.quantizer}, {config.steps} steps")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("test_mse", "train_mse", "utilization", "perplexity", "entropy_bits", "bits_per_token", "step_ms"):
        table.add_row(key, f"{metrics[key]:.4g}")
    if args.out is not None:
        table.add_row("written to", str(args.out))
    Console().print(table)
    return 0
