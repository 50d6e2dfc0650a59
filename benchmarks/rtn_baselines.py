"""The baseline every later algorithm must beat: RTN in every format on reference-lm and MiniLM.

    python benchmarks/rtn_baselines.py [--max-tokens N]

reference-lm: perplexity on the held-out Shakespeare split (windows of 256 tokens, its training context) and mean
KL / top-1 agreement to the full-precision model. MiniLM: cosine of sentence embeddings to the
full-precision model on the shipped 560-sentence set, and top-10 retrieval agreement.
"""

from __future__ import annotations

import argparse
import copy
import time

from common import markdown_table, write_result

import lowbit
from lowbit.eval import embedding_fidelity, evaluate_language, tokenize_text
from lowbit.models import load_model

CONFIGS = [
    ("INT8 (per-channel)", "int8", {"group_size": -1}),
    ("INT4-g128 (asym)", "int4", {"group_size": 128, "symmetric": False}),
    ("INT3-g128 (asym)", "int3", {"group_size": 128, "symmetric": False}),
    ("INT2-g64 (asym)", "int2", {"group_size": 64, "symmetric": False}),
    ("NF4 (g64)", "nf4", {}),
    ("FP4 E2M1 (g128)", "fp4", {}),
    ("MXFP4", "mxfp4", {}),
    ("NVFP4", "nvfp4", {}),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-tokens", type=int, default=None)
    args = p.parse_args()

    lm = load_model("reference-lm")
    ids = tokenize_text(lm.tokenizer, max_tokens=args.max_tokens)
    fp = evaluate_language(lm.model, ids, context=256, stride=256)
    lm_rows = [{"config": "FP (fp16 checkpoint)", "bits/weight": 16.0, "ppl": fp.ppl, "KL": 0.0, "top-1 agree": 1.0}]
    enc = load_model("minilm")
    enc_rows = [
        {"config": "FP (fp32)", "bits/weight": 32.0, "cosine mean": 1.0, "cosine min": 1.0, "top-10 overlap": 1.0}
    ]
    for label, fmt, kw in CONFIGS:
        step = lowbit.RTN(format=fmt, **kw)
        model = copy.deepcopy(lm.model)
        start = time.perf_counter()
        res = lowbit.quantize(model, step)
        seconds = time.perf_counter() - start
        ev = evaluate_language(model, ids, reference=lm.model, context=256, stride=256)
        lm_rows.append(
            {
                "config": label,
                "bits/weight": res.report.avg_bits_per_weight,
                "ppl": ev.ppl,
                "KL": ev.kl,
                "top-1 agree": ev.top1_agreement,
                "quantize s": seconds,
            }
        )
        enc_model = copy.deepcopy(enc.model)
        res = lowbit.quantize(enc_model, step)
        fid = embedding_fidelity(enc_model, enc.model, enc.tokenizer)
        enc_rows.append(
            {
                "config": label,
                "bits/weight": res.report.avg_bits_per_weight,
                "cosine mean": fid.cosine_mean,
                "cosine min": fid.cosine_min,
                "top-10 overlap": fid.retrieval_top10_overlap,
            }
        )
        print(lm_rows[-1], enc_rows[-1], flush=True)
    body = (
        f"## reference-lm (held-out text, {fp.tokens} tokens, context {fp.context}, stride {fp.stride})\n\n"
        "All linear layers in the blocks are quantized (lm_head and embeddings stay in full precision); bits/weight "
        "counts codes, scales and zero-points.\n\n"
        + markdown_table(
            lm_rows,
            ["config", "bits/weight", "ppl", "KL", "top-1 agree", "quantize s"],
            {"bits/weight": ".3f", "ppl": ".3f", "KL": ".2e", "top-1 agree": ".4f", "quantize s": ".2f"},
        )
        + "\n\n## MiniLM (all-MiniLM-L6-v2, 560 sentences, mean pooling)\n\n"
        + markdown_table(
            enc_rows,
            ["config", "bits/weight", "cosine mean", "cosine min", "top-10 overlap"],
            {"bits/weight": ".3f", "cosine mean": ".5f", "cosine min": ".4f", "top-10 overlap": ".4f"},
        )
    )
    write_result(
        "rtn_baselines",
        "RTN baselines: every format on reference-lm and MiniLM",
        body,
        {"reference_lm": lm_rows, "minilm": enc_rows},
    )


if __name__ == "__main__":
    main()
