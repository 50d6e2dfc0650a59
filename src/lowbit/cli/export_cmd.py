"""Convert a quantized checkpoint for another engine: lowbit export DIR --to gguf --out FILE.

DIR is any checkpoint lowbit reads (its compressed-tensors or packed output, or a compressed-tensors
checkpoint of another tool). The quantized layers are carried over as they are, without quantizing
again; a layer whose format the target cannot hold exactly is refused, naming the layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="convert a quantized checkpoint (to GGUF for llama.cpp)", description=__doc__)
    p.add_argument("model", help="a quantized model directory (or a built-in name, or a hub id)")
    p.add_argument("--to", choices=["gguf"], default="gguf", help="target format (default: gguf)")
    p.add_argument("--out", required=True, type=Path, help="output file (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name such as model.gguf")
    from ..export.atomic import check_writable

    check_writable(out)
    import torch
    from rich.console import Console

    from ..export.gguf import write_gguf
    from ..models import checkpoint_dtype, resolve_model_path
    from ..runtime import load

    path = resolve_model_path(args.model)
    # the unquantized tensors keep the checkpoint's float type (an fp16 model gives F16 tensors)
    loaded = load(path, dtype=checkpoint_dtype(path) or torch.float32, native_kernels=False)
    write_gguf(loaded.model, loaded.path, out)
    Console().print(f"wrote [bold]{out}[/bold] ({out.stat().st_size / 2**20:.2f} MiB)")
    return 0
