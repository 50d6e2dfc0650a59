"""RTN vs GPTQ vs AWQ vs HQQ vs AWQ+GPTQ at 4, 3 and 2 bits on reference-lm and MiniLM.

    python benchmarks/ptq_methods.py [--n-samples 128] [--seq-len 512] [--max-tokens N]

Calibration: the shipped calibration split (Macbeth, Much Ado), seeded; evaluation: the held-out
split (Julius Caesar, Twelfth Night) for reference-lm, the 560-sentence set for MiniLM.
"""

from __future__ import annotations

import argparse

from common import markdown_table, quantized_copy, write_result

from lowbit.algorithms import AWQ, GPTQ, HQQ, RTN
from lowbit.calibration import as_calibration
from lowbit.eval import embedding_fidelity, evaluate_language, tokenize_text
from lowbit.models import load_model

BITS = [("INT4-g128", 4, 128), ("INT3-g128", 3, 128), ("INT2-g64", 2, 64)]


def recipes(bits: int, gs: int) -> dict[str, list]:
    fmt = dict(format="int", bits=bits, group_size=gs, symmetric=False)
    return {
        "RTN": [RTN(**fmt)],
        "HQQ": [HQQ(**fmt)],
        "GPTQ": [GPTQ(**fmt)],
        "AWQ": [AWQ(**fmt)],
        "AWQ+GPTQ": [AWQ(**fmt), GPTQ(**fmt)],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256, help="reference-lm was trained on 256-token sequences")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--skip-minilm", action="store_true")
    args = p.parse_args()

    lm = load_model("reference-lm")
    ids = tokenize_text(lm.tokenizer, max_tokens=args.max_tokens)
    calib = as_calibration("builtin", lm.tokenizer, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    fp = evaluate_language(lm.model, ids, context=256, stride=256)
    lm_rows = [{"bits": "FP", "method": "-", "ppl": fp.ppl, "Δppl": 0.0, "KL": 0.0, "top-1 agree": 1.0}]
    for label, bits, gs in BITS:
        for method, recipe in recipes(bits, gs).items():
            model, res, seconds = quantized_copy(lm.model, recipe, calib)
            ev = evaluate_language(model, ids, reference=lm.model, context=256, stride=256)
            lm_rows.append(
                {
                    "bits": label,
                    "method": method,
                    "bits/weight": res.report.avg_bits_per_weight,
                    "ppl": ev.ppl,
                    "Δppl": ev.ppl - fp.ppl,
                    "KL": ev.kl,
                    "top-1 agree": ev.top1_agreement,
                    "seconds": seconds,
                }
            )
            print(lm_rows[-1], flush=True)

    enc_rows = []
    if not args.skip_minilm:
        enc = load_model("minilm")
        enc_calib = as_calibration(
            "builtin", enc.tokenizer, n_samples=args.n_samples, seq_len=128, seed=0, mode="lines"
        )
        for label, bits, gs in BITS:
            for method, recipe in recipes(bits, gs).items():
                model, res, seconds = quantized_copy(enc.model, recipe, enc_calib)
                fid = embedding_fidelity(model, enc.model, enc.tokenizer)
                enc_rows.append(
                    {
                        "bits": label,
                        "method": method,
                        "bits/weight": res.report.avg_bits_per_weight,
                        "cosine mean": fid.cosine_mean,
                        "cosine min": fid.cosine_min,
                        "top-10 overlap": fid.retrieval_top10_overlap,
                        "seconds": seconds,
                    }
                )
                print(enc_rows[-1], flush=True)

    fmt = {
        "bits/weight": ".3f",
        "ppl": ".3f",
        "Δppl": ".3f",
        "KL": ".2e",
        "top-1 agree": ".4f",
        "seconds": ".1f",
        "cosine mean": ".5f",
        "cosine min": ".4f",
        "top-10 overlap": ".4f",
    }
    body = (
        f"Calibration: {calib.describe()}. Asymmetric integer weights, fp16 scales and zero-points; all block linears "
        "quantized, lm_head/embeddings in full precision.\n\n"
        f"## reference-lm (held-out, {fp.tokens} tokens, windows of {fp.context} tokens, stride {fp.stride})\n\n"
        + markdown_table(lm_rows, ["bits", "method", "bits/weight", "ppl", "Δppl", "KL", "top-1 agree", "seconds"], fmt)
    )
    if enc_rows:
        body += f"\n\n## MiniLM (560 sentences; calibration {enc_calib.describe()})\n\n" + markdown_table(
            enc_rows, ["bits", "method", "bits/weight", "cosine mean", "cosine min", "top-10 overlap", "seconds"], fmt
        )
    write_result(
        "ptq_methods", "PTQ methods: RTN, HQQ, GPTQ, AWQ, AWQ+GPTQ", body, {"reference_lm": lm_rows, "minilm": enc_rows}
    )


if __name__ == "__main__":
    main()
