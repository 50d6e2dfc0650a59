"""Quantize a model and save it: lowbit quantize MODEL --method gptq --bits 4 --group-size 128 --out OUT.

The model is streamed block by block from its safetensors files; progress is kept after every
block (the same command resumes after a crash); the output directory appears only when complete.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .steps import builtin_step_names

#: checkpoints from this size on stream with glibc's allocator tuned to give memory back at once
#: (PipelineOptions.tune_allocator): it lowers the peak of big models and slows small ones
TUNE_ALLOCATOR_FROM_BYTES = 1 << 30


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save it", description=__doc__)
    p.add_argument("model", help="built-in model name (see `lowbit models`), model directory or hub id (org/name)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument(
        "--method",
        default="rtn",
        help=f"method, or methods joined by '+' (e.g. awq+gptq); one of {', '.join(builtin_step_names())} "
        "(default: rtn)",
    )
    p.add_argument(
        "--format",
        default="int",
        help="number format: int, fp8, fp6, fp4, mxfp4, mxfp8, nvfp4, nf4, binary, ternary, "
        "llama.cpp's q4_0 ... q8_0, q2_k ... q6_k ...",
    )
    p.add_argument("--bits", type=int, default=None, help="bits per code for integer formats (default 4)")
    p.add_argument(
        "--group-size", type=int, default=None, help="elements per scale group; -1: per output channel; 0: per tensor"
    )
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="no zero-point")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="with a zero-point per group")
    p.add_argument(
        "--clip",
        choices=["minmax", "mse", "llama.cpp"],
        default=None,
        help="clipping rule for scales (llama.cpp: its reference quantizers' rule, for q4_0 ... q6_k)",
    )
    p.add_argument(
        "--activations",
        default=None,
        metavar="FORMAT[:static]",
        help="also quantize the inputs of the quantized layers: int8, int4, fp8, mxfp4, nvfp4; scales per token "
        "computed at run time, or with ':static' one per tensor calibrated on the calibration data (W8A8: "
        "--format int --bits 8 --group-size -1 --activations int8)",
    )
    p.add_argument("--recipe", default=None, help="YAML recipe file (replaces --method/--format/...)")
    p.add_argument(
        "--ignore", action="append", default=None, help="layer name pattern to skip (repeatable; default lm_head)"
    )
    p.add_argument(
        "--calibration", default="builtin", help="calibration data: builtin, a text file, or hf:DATASET[:SPLIT]"
    )
    p.add_argument("--n-samples", type=int, default=128, help="calibration sequences")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per calibration sequence (default 512, or the model's context if shorter)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling (default: 0)")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="calibration sequences per forward pass (default: 8); the block forward's temporaries grow "
        "with it: use 1 for the lowest peak memory on models larger than memory",
    )
    p.add_argument(
        "--save-dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="dtype of saved weights (default: the input checkpoint's)",
    )
    p.add_argument(
        "--save-format",
        choices=["auto", "compressed-tensors", "lowbit", "gguf", "fake"],
        default="auto",
        help="how quantized layers are stored: compressed-tensors (packed; vLLM and transformers load it), lowbit "
        "(lowbit's packed layout: every format, read by lowbit.load), gguf (lowbit's layout plus OUT/model.gguf "
        "for llama.cpp), fake (dense dequantized weights, original size), auto (default: compressed-tensors where "
        "it holds every layer, else lowbit)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--dry-run", action="store_true", help="check everything and print the plan with estimates; quantize nothing"
    )
    p.add_argument(
        "--restart", action="store_true", help="discard the progress of an interrupted run instead of resuming it"
    )
    p.add_argument("--force", action="store_true", help="save even if the sanity check fails")
    p.add_argument(
        "--sanity-samples", type=int, default=4, help="calibration samples held back for the sanity check (0: off)"
    )
    p.add_argument(
        "--sanity-max-kl",
        type=float,
        default=1.0,
        help="largest mean KL (nats/token) to the original on held-back samples before the run is refused",
    )
    p.add_argument(
        "--sanity-generate",
        type=int,
        default=8,
        help="new tokens of the sanity check's greedy generation, original vs quantized (0: none)",
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="replace NaN/Inf weights by 0 instead of refusing")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(run=run)


def build_recipe(args: argparse.Namespace):
    from ..algorithms import STEPS, WeightQuantConfig
    from ..recipe import Recipe, as_recipe

    if args.recipe:
        return Recipe.from_yaml(args.recipe)
    methods = [m.strip() for m in args.method.split("+") if m.strip()]
    if not methods:
        raise ValueError(f"--method {args.method!r} names no method")
    steps = []
    for method in methods:
        if method not in STEPS:
            raise ValueError(
                f"--method: unknown method {method!r}; known: {', '.join(sorted(STEPS))}, or several joined by '+' "
                "(e.g. awq+gptq)"
            )
        config: dict = {}
        if issubclass(STEPS[method].Config, WeightQuantConfig):  # transforms (smoothquant) take no format
            config["format"] = args.format
            for key in ("bits", "group_size", "symmetric", "clip"):
                if getattr(args, key) is not None:
                    config[key] = getattr(args, key)
            if args.activations:
                fmt, _, how = args.activations.partition(":")
                if how not in ("", "static", "dynamic"):
                    raise ValueError(
                        f"--activations {args.activations!r}: write FORMAT, FORMAT:static or FORMAT:dynamic"
                    )
                config["input_activations"] = {"format": fmt, "dynamic": how != "static"}
        if args.ignore is not None:
            config["ignore"] = args.ignore
        steps.append({method: config})
    return as_recipe(steps)


def run(args: argparse.Namespace) -> int:
    from ..export.atomic import check_output_dir

    check_output_dir(args.out, args.overwrite)  # before the imports: a wrong --out fails at once

    import torch
    from rich.console import Console

    from ..api import quantize_checkpoint
    from ..models import resolve_model_path
    from ..pipeline import PipelineOptions, SanityThresholds

    for name in ("n_samples", "seq_len", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sanity_samples < 0:
        raise ValueError(f"--sanity-samples must be >= 0, got {args.sanity_samples}")
    if args.sanity_generate < 0:
        raise ValueError(f"--sanity-generate must be >= 0, got {args.sanity_generate}")
    if not args.sanity_max_kl > 0:
        raise ValueError(f"--sanity-max-kl must be > 0, got {args.sanity_max_kl}")
    recipe = build_recipe(args)
    model = resolve_model_path(args.model)
    options = PipelineOptions(
        device=args.device,
        batch_size=args.batch_size,
        allow_nonfinite=args.allow_nonfinite,
        progress=not args.json,
        sanity_samples=args.sanity_samples,
        sanity=SanityThresholds(max_kl=args.sanity_max_kl),
        sanity_generate=args.sanity_generate,
        tune_allocator=_weights_bytes(model) >= TUNE_ALLOCATOR_FROM_BYTES,
    )
    run_ = quantize_checkpoint(
        model,
        recipe,
        args.out,
        calibration=args.calibration,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        options=options,
        save_dtype=getattr(torch, args.save_dtype) if args.save_dtype else None,
        overwrite=args.overwrite,
        restart=args.restart,
        force=args.force,
        dry_run=args.dry_run,
        save_format=args.save_format,
    )
    console = Console()
    if args.dry_run:
        if args.json:
            print(json.dumps(run_.plan.to_dict(), indent=2))
        else:
            console.print(run_.plan.table())
        return 0
    if args.json:
        print(json.dumps({"out": str(run_.out_dir), **run_.report.to_dict()}, indent=2))
        return 0
    console.print(run_.report.table())
    if run_.sanity is not None:
        console.print(sanity_table(run_.sanity))
    console.print(run_.report.timings_table())
    if run_.resumed_from_block:
        console.print(f"resumed an interrupted run at block {run_.resumed_from_block}")
    console.print(f"saved to [bold]{run_.out_dir}[/bold]")
    return 0


def _weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def sanity_table(report):
    from rich.table import Table

    t = Table(title="sanity check (held-back samples, quantized vs original)")
    t.add_column("check")
    t.add_column("value", justify="right")
    t.add_row("tokens", str(report.tokens))
    t.add_row("mean KL divergence", f"{report.kl:.4f}")
    t.add_row("top-1 agreement", f"{report.top1_agreement:.4f}")
    t.add_row(
        "most frequent prediction share",
        f"{report.top_token_share:.3f} (original {report.top_token_share_reference:.3f})",
    )
    if report.generated_ids is not None:
        t.add_row("prompt (held-back sample)", _shown(report.prompt, report.prompt_ids))
        t.add_row("greedy continuation, original", _shown(report.generation_reference, report.generated_ids_reference))
        t.add_row("greedy continuation, quantized", _shown(report.generation, report.generated_ids))
    t.add_row("result", "passed" if report.passed else f"FAILED: {report.reason}")
    return t


def _shown(text: str | None, ids: list[int] | None) -> str:
    """The decoded text (escaped, so that newlines stay in the table), else the token ids."""
    if text is not None:
        return repr(text)
    return " ".join(str(i) for i in ids or [])
