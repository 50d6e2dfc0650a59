"""Generate text with a model, its quantized layers kept packed: lowbit generate MODEL --prompt TEXT.

Greedy decoding through transformers' generate(). Prints the continuation, the prefill and decode
speeds and the peak memory of the process.
"""

from __future__ import annotations

import argparse
import json
import time


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a (quantized) model", description=__doc__)
    p.add_argument("model", help="built-in model name, model directory or hub id (org/name)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="compute dtype (default: the checkpoint's; float16 checkpoints compute in float32 on the CPU)",
    )
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    import torch
    from rich.console import Console

    from ..pipeline.memory import return_freed_memory_promptly
    from ..pipeline.progress import peak_rss_bytes
    from ..runtime import load

    # a process-wide setting, so the command's and not the library's: unpacking each layer's codes on
    # load leaves freed buffers in glibc's heap, which otherwise stay resident (1.1B INT4: peak 2.43 GiB
    # against 1.34 GiB with large buffers in their own mappings)
    return_freed_memory_promptly()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, device=device)
    if loaded.kind != "causal-lm":
        raise ValueError(f"{args.model} is not a causal language model; generate needs one")
    if loaded.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer")
    ids = loaded.tokenizer(args.prompt, return_tensors="pt")["input_ids"].to(device)
    if ids.shape[1] == 0:
        raise ValueError("--prompt is empty after tokenisation")
    model = loaded.model
    stamps: list[float] = []

    class Stamp:  # a logits processor that only notes the time: called once per new token, after its forward
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
            logits_processor=[Stamp()],
        )
    prefill = stamps[0] - start
    decode = stamps[-1] - stamps[0]
    new = out[0, ids.shape[1] :]
    result = {
        "model": str(args.model),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": len(new),
        "text": loaded.tokenizer.decode(new, skip_special_tokens=True),
        "prefill_tokens_per_s": ids.shape[1] / max(prefill, 1e-9),
        "decode_tokens_per_s": (len(stamps) - 1) / decode if len(stamps) > 1 else None,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    console = Console()
    console.print(result["text"], highlight=False, soft_wrap=True)
    console.print(
        f"[dim]{result['prompt_tokens']} prompt tokens at {result['prefill_tokens_per_s']:.1f} tok/s, "
        f"{result['new_tokens']} new at {result['decode_tokens_per_s'] or 0:.1f} tok/s; "
        f"peak memory {result['peak_rss_bytes'] / 2**30:.2f} GiB[/dim]"
    )
    return 0
