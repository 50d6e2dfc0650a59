"""W4A4 with and without rotations (QuaRot) on reference-lm: perplexity and KL to the full-precision
model, plus the 4-bit KV cache on top (W4A4KV4).

    python benchmarks/rotations.py

Every row quantizes a fresh copy of the full-precision model with the recipe printed in the row.
W4: INT4 per output channel, symmetric (QuaRot's setting); A4: INT4 inputs of every block linear,
one scale per token (dynamic); KV4: keys per channel over groups of 32 tokens, values per token,
4-bit asymmetric, no full-precision window. The head and embeddings stay in full precision.
Writes results/rotations.md and .json.
"""

from __future__ import annotations

import argparse

from common import markdown_table, quantized_copy, write_result

from lowbit.calibration import as_calibration
from lowbit.eval import evaluate_language, tokenize_text
from lowbit.models import load_model
from lowbit.runtime.kv_cache import KVCacheScheme

W4 = {"format": "int4", "group_size": -1, "symmetric": True}
A4 = {"format": "int4", "dynamic": True}
A8 = {"format": "int8", "dynamic": True}
KV4 = KVCacheScheme(bits=4, group_size=32, residual=0)


def recipes() -> dict[str, tuple[list, KVCacheScheme | None]]:
    rtn = {"rtn": {**W4, "input_activations": A4}}
    gptq = {"gptq": {**W4, "input_activations": A4}}
    return {
        "W4A4 RTN": ([rtn], None),
        "W4A4 GPTQ": ([gptq], None),
        "W4A4 QuaRot + RTN": ([{"quarot": {}}, rtn], None),
        "W4A4 QuaRot + GPTQ": ([{"quarot": {}}, gptq], None),
        "W4A4 QuaRot (no online Hadamard) + GPTQ": ([{"quarot": {"online": False}}, gptq], None),
        "W4A4 QuaRot (random orthogonal) + GPTQ": ([{"quarot": {"rotation": "orthogonal"}}, gptq], None),
        "W4A8 GPTQ": ([{"gptq": {**W4, "input_activations": A8}}], None),
        "W4A8 QuaRot + GPTQ": ([{"quarot": {}}, {"gptq": {**W4, "input_activations": A8}}], None),
        "W4A4KV4 RTN": ([rtn], KV4),
        "W4A4KV4 QuaRot + GPTQ": ([{"quarot": {}}, gptq], KV4),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256, help="reference-lm was trained on 256-token sequences")
    args = p.parse_args()

    lm = load_model("reference-lm")
    ids = tokenize_text(lm.tokenizer)
    calib = as_calibration("builtin", lm.tokenizer, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    fp = evaluate_language(lm.model, ids, context=256, stride=256)
    rows = [{"recipe": "FP", "ppl": fp.ppl, "Δppl %": 0.0, "KL": 0.0, "top-1 agree": 1.0}]
    for label, (recipe, kv) in recipes().items():
        model, _, seconds = quantized_copy(lm.model, recipe, calib, progress=False)
        ev = evaluate_language(model, ids, reference=lm.model, context=256, stride=256, kv_cache=kv)
        rows.append(
            {
                "recipe": label,
                "ppl": ev.ppl,
                "Δppl %": 100 * (ev.ppl / fp.ppl - 1),
                "KL": ev.kl,
                "top-1 agree": ev.top1_agreement,
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
    fmt = {"ppl": ".3f", "Δppl %": "+.2f", "KL": ".2e", "top-1 agree": ".4f", "seconds": ".1f"}
    body = (
        f"Calibration: {calib.describe()}. W4: INT4 per output channel, symmetric; A4/A8: INT4/INT8 per token "
        "(dynamic) at the inputs of every block linear; KV4: "
        f"{KV4.model_dump()} (keys per channel over token groups, values per token). QuaRot: randomised Hadamard "
        "of the residual stream (norms fused), per-head Hadamard of values, online Hadamard before down_proj "
        "unless the row says otherwise. Seconds: quantization only.\n\n"
        f"## reference-lm (held-out, {fp.tokens} tokens, windows of {fp.context} tokens, stride {fp.stride})\n\n"
        + markdown_table(rows, ["recipe", "ppl", "Δppl %", "KL", "top-1 agree", "seconds"], fmt)
    )
    write_result("rotations", "Rotations: W4A4 and W4A4KV4 with and without QuaRot", body, {"reference_lm": rows})


if __name__ == "__main__":
    main()
