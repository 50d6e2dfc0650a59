"""lowbit next to llm-compressor (RTN, GPTQ, AWQ) and the hqq package on reference-lm: one run, same data,
settings pinned and printed, timings repeated in alternation.

    /work/peers-venv/bin/python benchmarks/peers.py [--repeats 3]

Needs the peers beside lowbit: ``pip install -c <(echo torch==2.13.0) llmcompressor hqq`` and lowbit itself
(``pip install --no-deps -e .`` plus its light dependencies) in one environment; llm-compressor pins an older
transformers, so a separate virtual environment is advisable. Every method sees the same calibration tokens (the
shipped calibration split, 128 x 256, seed 0) and is scored on the same held-out tokens (perplexity, KL divergence to
the full-precision model, top-1 agreement). Each pinned pair (lowbit's setting chosen to match the peer's) is timed
``--repeats`` times, the two tools alternating, and reported as median [min, max] seconds of the quantization call
alone; quality comes from the first repetition (every method is deterministic). lowbit's own defaults get a row of
their own where they differ from the pinned setting.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from common import markdown_table, write_result

import lowbit
from lowbit.algorithms import AWQ, GPTQ, HQQ, RTN
from lowbit.calibration import as_calibration
from lowbit.eval import evaluate_language, tokenize_text
from lowbit.models import load_model

CONFIGS = [("W4 g128", 4, 128), ("W3 g128", 3, 128)]

# What each pinned pair holds equal. llm-compressor 0.14 calibrates all linears of a decoder layer in one pass (no
# true-sequential), GPTQ with static act-order ("actorder: static"), and its AWQ measures the attention/MLP output
# (module objective), has no clip search, and rounds with min-max RTN afterwards.
PINNED = {
    "RTN": "asymmetric INT, group 128, min-max range (zero included), fp16 scales",
    "GPTQ": "block 128, dampening 0.01, act-order with static groups, no true-sequential",
    "AWQ": "duo scaling, grid 20, module (attention/MLP) output objective, no clip search, then min-max RTN",
    "HQQ": "20 iterations, l_p 0.7, beta 10, the paper's global early stop (lowbit stop='global', kappa=1 as hqq 0.2.8)",
}


def llmcompressor_quantize(model, calib, bits: int, group: int, method: str, tokenizer):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group),
    )
    if method == "GPTQ":
        recipe = GPTQModifier(
            config_groups={"group_0": scheme},
            ignore=["lm_head"],
            block_size=128,
            dampening_frac=0.01,
            actorder="static",
        )
    elif method == "AWQ":
        if not torch.accelerator.is_available():
            # llm-compressor 0.14's AWQ pins cached activations for faster host-to-device copies, which fails on a
            # machine without an accelerator; pinning changes no value, so on the CPU it is skipped
            from llmcompressor.pipelines.cache import IntermediatesCache

            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
        recipe = [
            AWQModifier(duo_scaling=True, n_grid=20),
            QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
        ]
    else:
        recipe = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    ds = Dataset.from_dict(
        {"input_ids": calib.input_ids.tolist(), "attention_mask": torch.ones_like(calib.input_ids).tolist()}
    )
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        max_seq_length=calib.seq_len,
        num_calibration_samples=calib.n_samples,
        processor=tokenizer,
    )
    return model


def hqq_peer_quantize(model, bits: int, group: int):
    from hqq.core.quantize import Quantizer as HQQQuantizer

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = module.weight.data.float()
            q, meta = HQQQuantizer.quantize(
                w, nbits=bits, group_size=group, optimize=True, axis=1, compute_dtype=torch.float32, device="cpu"
            )
            module.weight.data = HQQQuantizer.dequantize(q, meta).reshape(w.shape).to(module.weight.dtype)
    return model


def lowbit_steps(method: str, fmt: dict) -> tuple[list, list]:
    """(the step pinned to the peer's setting, lowbit's defaults) for ``method``."""
    if method == "RTN":
        return [RTN(**fmt)], []
    if method == "GPTQ":
        return [GPTQ(**fmt, act_order=True, static_groups=True, true_sequential=False)], [GPTQ(**fmt)]
    if method == "AWQ":
        return [AWQ(**fmt, objective="module", module_tokens=10**9, clip_search=False)], [AWQ(**fmt)]
    return [HQQ(**fmt, stop="global", kappa=1.0)], [HQQ(**fmt)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256, help="reference-lm was trained on 256-token sequences")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N held-out tokens only")
    args = p.parse_args()
    lm = load_model("reference-lm")
    ids = tokenize_text(lm.tokenizer, max_tokens=args.max_tokens)
    calib = as_calibration("builtin", lm.tokenizer, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    fp = evaluate_language(lm.model, ids, context=256, stride=256)
    rows = [{"config": "FP", "tool": "-", "method": "-", "setting": "-", "ppl": fp.ppl, "KL": 0.0, "top-1 agree": 1.0}]

    def record(config, tool, method, setting, model, times):
        ev = evaluate_language(model, ids, reference=lm.model, context=256, stride=256)
        row = {
            "config": config,
            "tool": tool,
            "method": method,
            "setting": setting,
            "ppl": ev.ppl,
            "KL": ev.kl,
            "top-1 agree": ev.top1_agreement,
            "seconds": f"{statistics.median(times):.2f} [{min(times):.2f}, {max(times):.2f}]",
        }
        rows.append(row)
        print(row, flush=True)

    def run_lowbit(steps):
        model = copy.deepcopy(lm.model)
        start = time.perf_counter()
        lowbit.quantize(
            model, steps, calibration=calib if any(s.needs_calibration for s in steps) else None, progress=False
        )
        return model, time.perf_counter() - start

    def run_peer(method, bits, group):
        model = copy.deepcopy(lm.model)
        start = time.perf_counter()
        if method == "HQQ":
            hqq_peer_quantize(model, bits, group)
        else:
            llmcompressor_quantize(model, calib, bits, group, method, lm.tokenizer)
        return model, time.perf_counter() - start

    peer_name = {"HQQ": "hqq"}
    for label, bits, group in CONFIGS:
        fmt = dict(format="int", bits=bits, group_size=group, symmetric=False)
        for method in ("RTN", "GPTQ", "AWQ", "HQQ"):
            pinned, defaults = lowbit_steps(method, fmt)
            ours, theirs, times_ours, times_theirs = None, None, [], []
            for r in range(args.repeats):  # alternate the order: neither tool always runs on a warmer machine
                order = ("lowbit", "peer") if r % 2 == 0 else ("peer", "lowbit")
                for tool in order:
                    if tool == "lowbit":
                        model, seconds = run_lowbit(pinned)
                        times_ours.append(seconds)
                        ours = ours or model
                    else:
                        model, seconds = run_peer(method, bits, group)
                        times_theirs.append(seconds)
                        theirs = theirs or model
            record(label, "lowbit", method, "pinned", ours, times_ours)
            record(label, peer_name.get(method, "llm-compressor"), method, "pinned", theirs, times_theirs)
            if defaults:
                model, seconds = run_lowbit(defaults)
                record(label, "lowbit", method, "lowbit defaults", model, [seconds])

    import importlib.metadata as md

    versions = {pkg: md.version(pkg) for pkg in ("llmcompressor", "compressed-tensors", "hqq", "transformers", "torch")}
    pinned = "\n".join(f"- **{m}**: {text}" for m, text in PINNED.items())
    body = (
        f"Peers: {versions}. Calibration: {calib.describe()}; asymmetric INT weights, group 128, lm_head kept; "
        f"evaluation on the held-out split ({fp.tokens} tokens, 256-token windows). Torch threads: "
        f"{torch.get_num_threads()}.\n\nSettings held equal in each pinned pair:\n\n{pinned}\n\n"
        "lowbit defaults: GPTQ with true-sequential; AWQ with its closed-form layer objective and clip search; HQQ "
        "with per-group early stop. Seconds: median [min, max] over the repetitions (pinned pairs alternate).\n\n"
        + markdown_table(
            rows,
            ["config", "tool", "method", "setting", "ppl", "KL", "top-1 agree", "seconds"],
            {"ppl": ".3f", "KL": ".2e", "top-1 agree": ".4f"},
        )
    )
    write_result(
        "peers_reference_lm",
        "lowbit vs llm-compressor and HQQ on reference-lm",
        body,
        {"rows": rows, "versions": versions, "pinned": PINNED, "repeats": args.repeats},
    )


if __name__ == "__main__":
    main()
