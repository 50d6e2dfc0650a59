"""lowbit next to llm-compressor (GPTQ, RTN) and HQQ on reference-lm, in one run, same data.

    /path/to/peers-venv/bin/python benchmarks/peers.py

Needs the peers installed beside lowbit: ``pip install -c <(echo torch==2.13.0) llmcompressor hqq``
(a separate virtual environment is advisable: llmcompressor pins an older transformers). Every
method sees the same calibration tokens (the shipped calibration split, 128 x 512, seed 0) and
is scored on the same held-out tokens. Wall time is the quantization call alone.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import markdown_table, write_result

import lowbit
from lowbit.algorithms import GPTQ, HQQ, RTN
from lowbit.calibration import as_calibration
from lowbit.eval import evaluate_language, tokenize_text
from lowbit.models import load_model

CONFIGS = [("W4 g128", 4, 128), ("W3 g128", 3, 128)]


def llmcompressor_quantize(model, calib, bits: int, group: int, method: str, tokenizer):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group),
    )
    if method == "gptq":
        recipe = GPTQModifier(
            config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128, dampening_frac=0.01
        )
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256, help="reference-lm was trained on 256-token sequences")
    p.add_argument("--max-tokens", type=int, default=None)
    args = p.parse_args()
    lm = load_model("reference-lm")
    ids = tokenize_text(lm.tokenizer, max_tokens=args.max_tokens)
    calib = as_calibration("builtin", lm.tokenizer, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    fp = evaluate_language(lm.model, ids, context=256, stride=256)
    rows = [{"config": "FP", "tool": "-", "method": "-", "ppl": fp.ppl, "KL": 0.0, "top-1 agree": 1.0}]

    def record(config, tool, method, model, seconds):
        ev = evaluate_language(model, ids, reference=lm.model, context=256, stride=256)
        rows.append(
            {
                "config": config,
                "tool": tool,
                "method": method,
                "ppl": ev.ppl,
                "KL": ev.kl,
                "top-1 agree": ev.top1_agreement,
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)

    for label, bits, group in CONFIGS:
        fmt = dict(format="int", bits=bits, group_size=group, symmetric=False)
        for method, step in (("RTN", RTN(**fmt)), ("HQQ", HQQ(**fmt)), ("GPTQ", GPTQ(**fmt))):
            model = copy.deepcopy(lm.model)
            t = time.perf_counter()
            lowbit.quantize(model, step, calibration=calib)
            record(label, "lowbit", method, model, time.perf_counter() - t)
        for method in ("rtn", "gptq"):
            model = copy.deepcopy(lm.model)
            t = time.perf_counter()
            llmcompressor_quantize(model, calib, bits, group, method, lm.tokenizer)
            record(label, "llm-compressor", method.upper(), model, time.perf_counter() - t)
        model = copy.deepcopy(lm.model)
        t = time.perf_counter()
        hqq_peer_quantize(model, bits, group)
        record(label, "hqq", "HQQ", model, time.perf_counter() - t)

    import importlib.metadata as md

    versions = {pkg: md.version(pkg) for pkg in ("llmcompressor", "compressed-tensors", "hqq", "transformers", "torch")}
    body = (
        f"Peers: {versions}. Calibration: {calib.describe()}; asymmetric INT weights, group 128, lm_head kept; "
        f"evaluation on the held-out split ({fp.tokens} tokens).\n\n"
        + markdown_table(
            rows,
            ["config", "tool", "method", "ppl", "KL", "top-1 agree", "seconds"],
            {"ppl": ".3f", "KL": ".2e", "top-1 agree": ".4f", "seconds": ".1f"},
        )
    )
    write_result(
        "peers_reference_lm",
        "lowbit vs llm-compressor and HQQ on reference-lm",
        body,
        {"rows": rows, "versions": versions},
    )


if __name__ == "__main__":
    main()
