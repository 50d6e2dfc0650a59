"""The quantized KV cache on reference-lm: perplexity and KL to the full-precision cache for 8/4/3/2-bit
keys and values, with and without the full-precision window of recent tokens (and attention sinks
at 2-3 bits), with the cache's bytes per token.

    python benchmarks/kv_cache.py

Each 256-token window of the held-out text goes through the model in one forward pass with the
quantized cache: every token outside the sinks and the last ``window`` positions reaches every query
quantized (stricter than generation, where each new token keeps its own recent window). Writes
results/kv_cache.md and .json.
"""

from __future__ import annotations

import time

from common import markdown_table, write_result

from lowbit.eval import evaluate_language, tokenize_text
from lowbit.models import load_model
from lowbit.runtime.kv_cache import KVCacheScheme, cache_dims, fp16_bytes_per_token


def main() -> None:
    lm = load_model("reference-lm")
    ids = tokenize_text(lm.tokenizer)
    fp = evaluate_language(lm.model, ids, context=256, stride=256)
    dims = cache_dims(lm.model.config)
    rows = [{"KV cache": "FP16", "bytes/token": fp16_bytes_per_token(*dims), "ppl": fp.ppl, "Δppl %": 0.0, "KL": 0.0}]
    for bits in (8, 4, 3, 2):
        for residual in (0, 32):
            for sinks in (0, 4) if bits <= 3 else (0,):
                scheme = KVCacheScheme(bits=bits, group_size=32, residual=residual, sinks=sinks)
                start = time.perf_counter()
                ev = evaluate_language(lm.model, ids, reference=lm.model, context=256, stride=256, kv_cache=scheme)
                rows.append(
                    {
                        "KV cache": f"INT{bits}, window {residual}, sinks {sinks}",
                        "bytes/token": scheme.bytes_per_token(*dims),
                        "ppl": ev.ppl,
                        "Δppl %": 100 * (ev.ppl / fp.ppl - 1),
                        "KL": ev.kl,
                        "seconds": time.perf_counter() - start,
                    }
                )
                print(rows[-1], flush=True)
    fmt = {"bytes/token": ".0f", "ppl": ".3f", "Δppl %": "+.2f", "KL": ".2e", "seconds": ".1f"}
    body = (
        f"reference-lm, held-out text ({fp.tokens} tokens, windows of {fp.context}, stride {fp.stride}); weights "
        "in full precision. Keys: one scale and zero-point per channel over each group of 32 tokens; values: "
        "one per token (whole head). Bytes per token: packed codes plus fp16 scales and zero-points, all "
        "layers, keys and values (FP16: the unquantized cache).\n\n"
        + markdown_table(rows, ["KV cache", "bytes/token", "ppl", "Δppl %", "KL", "seconds"], fmt)
    )
    write_result("kv_cache", "Quantized KV cache", body, {"rows": rows})


if __name__ == "__main__":
    main()
