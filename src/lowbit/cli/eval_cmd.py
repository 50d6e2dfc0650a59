"""Evaluate a model: perplexity, KL divergence and top-1 agreement to a reference, embedding fidelity,
lm-eval tasks. Causal LMs get perplexity (and KL with --reference); encoders get embedding fidelity.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a model (perplexity, KL to a reference, embedding fidelity)", description=__doc__
    )
    p.add_argument("model", help="built-in model name, model directory or hub id (org/name)")
    p.add_argument(
        "--reference", default=None, help="the full-precision original to compare against (name or directory)"
    )
    p.add_argument("--ppl", action="store_true", help="perplexity (causal LMs; default for them)")
    p.add_argument("--kl", action="store_true", help="KL divergence and top-1 agreement to --reference (causal LMs)")
    p.add_argument("--embeddings", action="store_true", help="sentence-embedding fidelity to --reference (encoders)")
    p.add_argument("--text", default=None, help="text file to evaluate on (default: the built-in held-out text)")
    p.add_argument(
        "--context", type=int, default=None, help="tokens per window (default 512, or the model's context if shorter)"
    )
    p.add_argument("--stride", type=int, default=None, help="tokens the window advances (default half the context)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    p.add_argument("--batch-size", type=int, default=8, help="windows (or sentences) per forward pass (default: 8)")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval tasks (needs lowbit[lm-eval] and the tasks' datasets: on a machine "
        "without network, local task YAML files through --tasks-path)",
    )
    p.add_argument(
        "--kv-bits",
        default=None,
        help="quantize the KV cache the perplexity is computed through: 2, 3, 4, 8 or fp8 (keys per channel, "
        "values per token, KIVI-style)",
    )
    p.add_argument("--kv-group-size", type=int, default=32, help="tokens per key group (default: 32)")
    p.add_argument("--kv-residual", type=int, default=32, help="recent tokens kept in full precision (default: 32)")
    p.add_argument("--kv-sinks", type=int, default=0, help="first tokens never quantized (default: 0)")
    p.add_argument("--tasks-path", default=None, help="folder of lm-eval task YAML files")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..eval import embedding_fidelity, evaluate_language, run_lm_eval, tokenize_text
    from ..models import load_model
    from ..runtime import load

    if args.tasks:
        import os

        from ..models.hub import hub_unreachable_reason

        if hub_unreachable_reason() is not None:  # datasets would retry each download several times first
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # quantized layers stay packed (lowbit.load), dequantized per call and computed exactly in float32 like the
    # reference (the weight-only kernels compute in bfloat16, which would blur small differences)
    loaded = load(args.model, dtype=torch.float32, device=device, native_kernels=False)
    reference = load_model(args.reference, device=device) if args.reference else None
    causal = loaded.kind == "causal-lm"
    want_kl = args.kl or (causal and reference is not None and not (args.ppl or args.embeddings))
    want_ppl = args.ppl or want_kl or (causal and not (args.embeddings or args.tasks))
    want_emb = args.embeddings or (not causal and not args.tasks)
    if (want_kl or want_emb) and reference is None:
        raise ValueError(f"{'--kl' if want_kl else '--embeddings'} needs --reference ORIGINAL")
    if (want_ppl or want_kl) and not causal:
        raise ValueError(f"{args.model} is an encoder; perplexity and KL need a causal LM (use --embeddings)")
    if want_emb and causal:
        raise ValueError(f"{args.model} is a causal LM; --embeddings needs an encoder")
    results: dict = {"model": str(args.model), "reference": args.reference}
    kv = None
    if args.kv_bits is not None:
        from ..runtime.kv_cache import KVCacheScheme, cache_dims, fp16_bytes_per_token

        if not causal:
            raise ValueError("--kv-bits needs a causal LM")
        bits = int(args.kv_bits) if args.kv_bits.isdigit() else args.kv_bits
        kv = KVCacheScheme(bits=bits, group_size=args.kv_group_size, residual=args.kv_residual, sinks=args.kv_sinks)
        dims = cache_dims(loaded.model.config)
        results["kv_cache"] = kv.model_dump()
        results["kv_bytes_per_token"] = kv.bytes_per_token(*dims)
        results["kv_bytes_per_token_fp16"] = float(fp16_bytes_per_token(*dims))
    if want_ppl:
        ids = tokenize_text(loaded.tokenizer, path=args.text, max_tokens=args.max_tokens)
        res = evaluate_language(
            loaded.model,
            ids,
            reference=reference.model if want_kl else None,
            context=args.context,
            stride=args.stride,
            batch_size=args.batch_size,
            progress=not args.json,
            kv_cache=kv,
        )
        results.update(res.to_dict())
    if want_emb:
        results.update(embedding_fidelity(loaded.model, reference.model, loaded.tokenizer).to_dict())
    if args.tasks:
        results["tasks"] = run_lm_eval(
            loaded.model, loaded.tokenizer, args.tasks.split(","), include_path=args.tasks_path, limit=args.limit
        )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    table = Table(title=f"lowbit eval: {args.model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        if key == "tasks":
            for task, metrics in value.items():
                for m, v in metrics.items():
                    table.add_row(f"{task}/{m}", f"{v:.4f}")
        elif isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif value is not None:
            table.add_row(key, str(value))
    Console().print(table)
    return 0
