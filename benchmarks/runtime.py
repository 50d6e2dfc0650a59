"""The packed runtime: size on disk, peak memory, decode and prefill speed, against plain transformers.

    python benchmarks/runtime.py MODEL_DIR [--quantized INT4=DIR INT8=DIR Q4_K=DIR ...] [--prefill-batch 8]

For the original checkpoint and each quantized one, in separate processes (so each peak is its own):

- size on disk of the weight files;
- ``generate``: load, then greedy decoding of ``--new-tokens`` tokens after a 16-token prompt, batch 1:
  decode tokens/s (after the first new token) and peak RSS of the whole process. The original runs
  in plain transformers (``from_pretrained`` in its dtype, ``generate``); quantized checkpoints in
  lowbit's packed runtime (``lowbit.load``: weights stay packed);
- ``prefill``: one forward of ``--prefill-batch`` x 512 tokens (no cache), seconds and tokens/s.

Runs alternate between the models (``--repeats`` rounds); medians are reported with the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import markdown_table, write_result

CHILD = r"""
import json, resource, sys, time, torch
path, mode, runtime, new_tokens, prefill_batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from lowbit.pipeline.memory import return_freed_memory_promptly
return_freed_memory_promptly()  # as `lowbit generate` does; for both runtimes, so the comparison stays even
if runtime == "transformers":
    import transformers
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=config.dtype).eval()
else:
    import lowbit
    model = lowbit.load(path).model
vocab = model.config.vocab_size
gen = torch.Generator().manual_seed(0)
result = {}
with torch.inference_mode():
    if mode == "generate":
        ids = torch.randint(3, vocab, (1, 16), generator=gen)
        stamps = []
        class Stamp:
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter()); return scores
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, logits_processor=[Stamp()], pad_token_id=0)
        result["decode_tok_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    else:
        ids = torch.randint(3, vocab, (prefill_batch, 512), generator=gen)
        model(input_ids=ids[:1, :16], use_cache=False)  # warm up (and the packed layers' kernel choice)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        seconds = time.perf_counter() - start
        result.update(prefill_s=seconds, prefill_tok_s=ids.numel() / seconds)
result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(result))
"""


def weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors",))


def run(path: Path, mode: str, runtime: str, args) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mode, runtime, str(args.new_tokens), str(args.prefill_batch)],
        capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", type=Path, help="the original checkpoint (its own dtype, e.g. bf16)")
    p.add_argument("--quantized", nargs="*", default=[], help="LABEL=DIR of quantized checkpoints of it")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default="generate,prefill")
    args = p.parse_args()
    models = {"original (transformers)": (args.model, "transformers")}
    for item in args.quantized:
        label, _, path = item.partition("=")
        models[f"{label} (lowbit.load)"] = (Path(path), "lowbit")
    samples: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.repeats):
        for mode in args.modes.split(","):
            for label, (path, runtime) in models.items():
                samples.setdefault((label, mode), []).append(run(path, mode, runtime, args))
                print(r, label, mode, samples[(label, mode)][-1], flush=True)
    original_size = weights_bytes(args.model)
    rows = []
    for label, (path, _) in models.items():
        row = {"checkpoint": label, "size GiB": weights_bytes(path) / 2**30}
        row["size / original"] = row["size GiB"] / (original_size / 2**30)
        for mode in args.modes.split(","):
            for key in ("decode_tok_s", "prefill_tok_s", "peak_rss_gib"):
                values = [s[key] for s in samples[(label, mode)] if key in s]
                if values:
                    name = f"{mode} peak GiB" if key == "peak_rss_gib" else key
                    row[name] = f"{statistics.median(values):.3g} [{min(values):.3g}, {max(values):.3g}]"
        rows.append(row)
    columns = [
        "checkpoint",
        "size GiB",
        "size / original",
        "decode_tok_s",
        "generate peak GiB",
        "prefill_tok_s",
        "prefill peak GiB",
    ]
    body = (
        f"Model: `{args.model}`. Generate: 16-token prompt, {args.new_tokens} new tokens, greedy, batch 1 (decode "
        f"tokens/s after the first new token). Prefill: one forward of {args.prefill_batch} x 512 tokens. Each "
        f"checkpoint in its own process, {args.repeats} rounds alternating; median [min, max]. Every process fixes "
        "glibc's mmap threshold first, as `lowbit generate` does (transformers' runs too).\n\n"
        + markdown_table(
            rows, [c for c in columns if any(c in r for r in rows)], {"size GiB": ".3f", "size / original": ".3f"}
        )
    )
    write_result(f"runtime_{args.model.name}", f"Packed runtime on {args.model.name}", body, {"rows": rows})


if __name__ == "__main__":
    main()
