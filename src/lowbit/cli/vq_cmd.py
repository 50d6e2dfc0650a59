"""``lowbit vq-train``: train the 8x8-digits VQ-VAE example with one quantizer type.

Writes ``reconstructions.png`` (originals vs reconstructions) and ``metrics.json`` to ``--out`` (by default
``runs/vq-train-QUANTIZER``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

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
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for reconstructions.png and metrics.json, created if missing; other files in it are left "
        "alone (default: runs/vq-train-QUANTIZER)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(run=run)


def default_out(quantizer: str) -> Path:
    return Path("runs") / f"vq-train-{quantizer}"


def _check_out(out: Path) -> None:
    """Fail before training if ``out`` cannot hold the results (a file, or a directory we cannot write)."""
    from ..export.atomic import check_writable

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if not out.exists():
        check_writable(out)  # its nearest existing parent
        return
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise PermissionError(f"cannot write to --out {out} ({exc.strerror})") from None


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside ``path``, flush it to disk, then rename: ``path`` is never half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_outputs(out: Path, trainer: Any, metrics: dict[str, Any]) -> None:
    """The PNG, then metrics.json, each complete before it appears.

    metrics.json is the run's commit record: a stale one goes first and the new one is written last, so after a
    crash a metrics.json present is complete and describes the PNG beside it. The directory itself is not swapped
    (it may be the user's, holding other files).
    """
    from ..vq.digits import save_reconstructions

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    metrics["png"] = str(save_reconstructions(trainer.model, trainer.test_x, out / "reconstructions.png"))
    _write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from ..vq.digits import DigitsConfig, train_digits

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out: Path = args.out if args.out is not None else default_out(args.quantizer)
    try:
        config = DigitsConfig(
            quantizer=args.quantizer, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            hidden=args.hidden,
        )  # fmt: skip
    except ValueError as exc:  # "batch_size: must be >= 1" -> "--batch-size: must be >= 1"
        field, _, message = str(exc).partition(": ")
        raise ValueError(f"--{field.replace('_', '-')}: {message}") from None
    _check_out(out)  # now, not after the training

    err = Console(stderr=True)
    columns = (TextColumn(f"vq-train {args.quantizer}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("train", total=config.steps, info="")

        def report(step: int, losses: dict[str, float]) -> None:
            progress.update(task, completed=step, info=f"mse {losses['recon_mse']:.4f}")

        trainer, metrics = train_digits(config, progress=report)

    _write_outputs(out, trainer, metrics)
    written = f"wrote {out / 'reconstructions.png'} and {out / 'metrics.json'}"
    if args.json:  # stdout stays pure JSON; where the files went goes to stderr
        print(json.dumps(metrics, indent=2))
        err.print(written, highlight=False, soft_wrap=True)
        return 0
    table = Table(title=f"digits VQ-VAE, {args.quantizer}, {config.steps} steps")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("test_mse", "train_mse", "utilization", "perplexity", "entropy_bits", "bits_per_token", "step_ms"):
        table.add_row(key, f"{metrics[key]:.4g}")
    console = Console()
    console.print(table)
    console.print(written, highlight=False, soft_wrap=True)
    return 0
