"""Weights and activations: W8A8 RTN against SmoothQuant and Outlier Suppression+, static and dynamic activation scales, and
4-bit activations, on reference-lm (perplexity, KL to FP) and MiniLM (embedding cosine to FP).

    python benchmarks/activations.py [--skip-minilm]

Every row quantizes a fresh copy of the full-precision model with the recipe printed in the row;
activations are fake-quantized at the inputs of every block linear (the head and embeddings stay
in full precision). Writes results/activations.md and .json.
"""

from __future__ import annotations

import argparse

from common import markdown_table, quantized_copy, write_result

from lowbit.calibration import as_calibration
from lowbit.eval import embedding_fidelity, evaluate_language, tokenize_text
from lowbit.models import load_model

W8 = {"format": "int8", "group_size": -1}
W4 = {"format": "int4", "group_size": 128, "symmetric": False}
A8_TOKEN = {"format": "int8", "dynamic": True}
A8_TENSOR = {"format": "int8", "dynamic": False}
A8_TENSOR_PCT = {"format": "int8", "dynamic": False, "observer": "percentile", "percentile": 99.99}
A4_TOKEN = {"format": "int4", "dynamic": True}


def recipes() -> dict[str, list]:
    def rtn(weights, acts):
        return {"rtn": {**weights, "input_activations": acts}}

    def gptq(weights, acts):
        return {"gptq": {**weights, "input_activations": acts}}

    return {
        "W8 weight-only RTN": [{"rtn": W8}],
        "W8A8 RTN, per-tensor static (minmax)": [rtn(W8, A8_TENSOR)],
        "W8A8 RTN, per-tensor static (percentile 99.99)": [rtn(W8, A8_TENSOR_PCT)],
        "W8A8 SmoothQuant a=0.5 + RTN, per-tensor static": [{"smoothquant": {"alpha": 0.5}}, rtn(W8, A8_TENSOR)],
        "W8A8 SmoothQuant a=search + RTN, per-tensor static": [
            {"smoothquant": {"alpha": "search"}},
            rtn(W8, A8_TENSOR),
        ],
        "W8A8 OS+ (search) + RTN, per-tensor static": [{"os_plus": {}}, rtn(W8, A8_TENSOR)],
        "W8A8 RTN, per-token dynamic": [rtn(W8, A8_TOKEN)],
        "W8A8 SmoothQuant a=0.5 + RTN, per-token dynamic": [{"smoothquant": {"alpha": 0.5}}, rtn(W8, A8_TOKEN)],
        "W8A8 OS+ (search) + RTN, per-token dynamic": [
            {"os_plus": {"search_activations": A8_TOKEN}},
            rtn(W8, A8_TOKEN),
        ],
        "W4A8 GPTQ, per-token dynamic": [gptq(W4, A8_TOKEN)],
        "W4A8 SmoothQuant a=0.5 + GPTQ, per-token dynamic": [{"smoothquant": {"alpha": 0.5}}, gptq(W4, A8_TOKEN)],
        "W8A4 RTN, per-token dynamic": [rtn(W8, A4_TOKEN)],
        "W8A4 SmoothQuant a=0.5 + RTN, per-token dynamic": [{"smoothquant": {"alpha": 0.5}}, rtn(W8, A4_TOKEN)],
        "W8A4 OS+ (search) + RTN, per-token dynamic": [
            {"os_plus": {"search_activations": A4_TOKEN}},
            rtn(W8, A4_TOKEN),
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256, help="reference-lm was trained on 256-token sequences")
    p.add_argument("--skip-minilm", action="store_true")
    args = p.parse_args()

    lm = load_model("reference-lm")
    ids = tokenize_text(lm.tokenizer)
    calib = as_calibration("builtin", lm.tokenizer, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    fp = evaluate_language(lm.model, ids, context=256, stride=256)
    lm_rows = [{"recipe": "FP", "ppl": fp.ppl, "Δppl %": 0.0, "KL": 0.0, "top-1 agree": 1.0}]
    for label, recipe in recipes().items():
        model, _, seconds = quantized_copy(lm.model, recipe, calib, progress=False)
        ev = evaluate_language(model, ids, reference=lm.model, context=256, stride=256)
        lm_rows.append(
            {
                "recipe": label,
                "ppl": ev.ppl,
                "Δppl %": 100 * (ev.ppl / fp.ppl - 1),
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
        for label, recipe in recipes().items():
            if "GPTQ" in label:
                continue
            model, _, seconds = quantized_copy(enc.model, recipe, enc_calib, progress=False)
            fid = embedding_fidelity(model, enc.model, enc.tokenizer)
            enc_rows.append(
                {
                    "recipe": label,
                    "cosine mean": fid.cosine_mean,
                    "1 - cosine": 1 - fid.cosine_mean,
                    "cosine min": fid.cosine_min,
                    "top-10 overlap": fid.retrieval_top10_overlap,
                    "seconds": seconds,
                }
            )
            print(enc_rows[-1], flush=True)

    fmt = {
        "ppl": ".3f",
        "Δppl %": "+.2f",
        "KL": ".2e",
        "top-1 agree": ".4f",
        "seconds": ".1f",
        "cosine mean": ".5f",
        "1 - cosine": ".5f",
        "cosine min": ".4f",
        "top-10 overlap": ".4f",
    }
    body = (
        f"Calibration: {calib.describe()}. W8: INT8 per output channel, symmetric; W4: INT4 g128 asymmetric. "
        "A8: INT8 inputs of every block linear, one static scale per tensor (calibrated) or one per token "
        "(dynamic); A4: INT4 per token. Head and embeddings in full precision.\n\n"
        f"## reference-lm (held-out, {fp.tokens} tokens, windows of {fp.context} tokens, stride {fp.stride})\n\n"
        + markdown_table(lm_rows, ["recipe", "ppl", "Δppl %", "KL", "top-1 agree", "seconds"], fmt)
    )
    if enc_rows:
        body += (
            f"\n\n## MiniLM (560 sentences; calibration {enc_calib.describe()})\n\n"
            "BERT is post-LN: the norm before q/k/v and before the MLP also feeds the residual, so SmoothQuant "
            "and OS+ can only fold into value -> attention output here.\n\n"
            + markdown_table(
                enc_rows, ["recipe", "cosine mean", "1 - cosine", "cosine min", "top-10 overlap", "seconds"], fmt
            )
        )
    write_result(
        "activations",
        "Weights and activations: W8A8, SmoothQuant, OS+, W4A8, W8A4",
        body,
        {"reference_lm": lm_rows, "minilm": enc_rows},
    )


if __name__ == "__main__":
    main()
