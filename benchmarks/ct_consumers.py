"""What engines compute from lowbit's compressed-tensors exports, against lowbit's own fake-quant model.

    python benchmarks/ct_consumers.py

reference-lm, quantized to compressed-tensors and to lowbit's fake-quant layout with the same
recipe. On the built-in held-out text (256-token windows), for each export: KL divergence per token
from the fake-quant model (the values lowbit computed) to

- transformers' own loader (``AutoModelForCausalLM.from_pretrained``, compressed-tensors
  decompressing the packed weights; its dequantize path where its default one cannot read the
  format, as in tests/export/test_compressed_tensors.py), float32;
- ``lowbit.load`` with the packed runtime's kernels (int8-rounded activations in lowbit's int4
  kernel, bf16 in torch's int8 kernel: what `lowbit generate` runs), in the checkpoint's dtype.

Beside them, the fake-quant model's own KL from the original, for scale.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_result

import lowbit
from lowbit.algorithms import GPTQ, RTN
from lowbit.api import quantize_checkpoint
from lowbit.eval import evaluate_language, tokenize_text
from lowbit.models import load_model
from lowbit.pipeline import PipelineOptions

RECIPES = {
    "GPTQ int4 g128 sym": GPTQ(format="int4", group_size=128),
    "GPTQ int4 g128 asym": GPTQ(format="int4", group_size=128, symmetric=False),
    "RTN int8 channel": RTN(format="int8", group_size=-1),
    "RTN fp8 channel": RTN(format="fp8"),
    "RTN nvfp4": RTN(format="nvfp4"),
    "RTN mxfp4": RTN(format="mxfp4"),
}


def transformers_load(path: Path, spec) -> torch.nn.Module:
    kwargs = {}
    if spec.has_zero_point or (spec.kind == "fp" and spec.bits == 4):
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=8192)
    args = p.parse_args()
    original = load_model("reference-lm", dtype=torch.float32)
    ids = tokenize_text(original.tokenizer, max_tokens=args.max_tokens)
    options = PipelineOptions(progress=False, sanity_samples=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, step in RECIPES.items():
            kw = dict(n_samples=128, seq_len=256, options=options)
            ct = quantize_checkpoint("reference-lm", [step], Path(tmp) / "ct", save_format="compressed-tensors", **kw)
            fake = quantize_checkpoint("reference-lm", [step], Path(tmp) / "fake", save_format="fake", **kw)
            ours = load_model(fake.out_dir, dtype=torch.float32).model
            theirs = transformers_load(ct.out_dir, step.config.spec)
            packed = lowbit.load(ct.out_dir).model

            def kl(model, reference):
                return evaluate_language(model, ids, reference=reference, context=256, stride=256).kl

            rows.append(
                {
                    "recipe": label,
                    "on disk MiB (CT)": ct.report.size_on_disk_bytes / 2**20,
                    "KL transformers vs lowbit": kl(theirs, ours),
                    "KL lowbit.load (kernels) vs lowbit": kl(packed, ours),
                    "KL lowbit vs original": kl(ours, original.model),
                }
            )
            print(rows[-1], flush=True)
            for d in (ct.out_dir, fake.out_dir):
                shutil.rmtree(d)
    columns = list(rows[0])
    formats = {c: ".3e" for c in columns if c.startswith("KL")} | {"on disk MiB (CT)": ".2f"}
    body = (
        f"reference-lm; calibration 128 x 256 tokens; KL per token on {len(ids)} held-out tokens in 256-token "
        "windows, KL(second || first) as named.\n\n" + markdown_table(rows, columns, formats)
    )
    write_result("ct_consumers", "compressed-tensors exports as engines load them", body, {"rows": rows})


if __name__ == "__main__":
    main()
