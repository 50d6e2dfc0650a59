"""Write the activation-quantized llm-compressor fixtures (tests/data/llmcompressor/w8a8-*, fp8-dynamic).

Run with llm-compressor installed (its own environment; lowbit does not depend on it):

    python scripts/make_llmcompressor_activation_fixtures.py [OUT_DIR]
"""

import sys
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

src = Path(__file__).parents[1] / "tests/data/llmcompressor/tiny-llama-dense"
out_root = Path(sys.argv[1]) if len(sys.argv) > 1 else src.parent
tok = AutoTokenizer.from_pretrained(src)
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, 128, (32, 32), generator=g)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
for name, scheme in [("w8a8-int8-dynamic", "W8A8"), ("fp8-dynamic", "FP8_DYNAMIC"), ("w8a8-int8-static", None)]:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    if scheme is None:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        qs = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
            input_activations=QuantizationArgs(
                num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False
            ),
        )
        mod = QuantizationModifier(config_groups={"group_0": qs}, ignore=["lm_head"])
    else:
        mod = QuantizationModifier(scheme=scheme, targets="Linear", ignore=["lm_head"])
    oneshot(model=model, dataset=ds, recipe=mod, num_calibration_samples=32, max_seq_length=32)
    out = out_root / name
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    print("wrote", out)
