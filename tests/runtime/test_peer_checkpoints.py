"""Checkpoints llm-compressor wrote load into lowbit (packed and dequantized) with the weights transformers reads."""

from pathlib import Path

import pytest
import torch
import transformers

import lowbit
from lowbit.runtime import PackedLinear

DATA = Path(__file__).resolve().parent.parent / "data" / "llmcompressor"
CHECKPOINTS = sorted(p.name for p in DATA.iterdir() if p.is_dir() and p.name != "tiny-llama-dense")


def _transformers_weights(path: Path) -> dict[str, torch.Tensor]:
    """The dense weights transformers + compressed-tensors decompress (its default path reads every fixture here:
    symmetric weights, so no packed zero-points)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))  # decompresses on the first forward
    return {n: p.detach().float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_lowbit_reads_llmcompressor_checkpoints(name):
    path = DATA / name
    packed = lowbit.load(path, dtype=torch.float32, native_kernels=False)
    layers = {n: m for n, m in packed.model.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 14  # every linear but lm_head
    if "asym" in name or "fp4" in name:
        # transformers 5.24's default path cannot size packed zero-points and gives FP4 layers bf16 weights in an fp32
        # model: its dequantize path reads both
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
        )
        reference = {n: p.detach().float() for n, p in model.named_parameters()}
    else:
        reference = _transformers_weights(path)
    for layer_name, module in layers.items():
        # exact where transformers decompresses in float32 (its default path); its dequantize path computes in the
        # checkpoint's bf16: one bf16 rounding
        rtol = 2**-8 if "fp4" in name or "asym" in name else 0.0
        torch.testing.assert_close(module.dense_weight(), reference[f"{layer_name}.weight"], rtol=rtol, atol=1e-8)
    dense = lowbit.load_model(path)  # dequantized into ordinary linears, e.g. to quantize again
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense.model(input_ids=ids).logits, packed.model(input_ids=ids).logits)


ACTIVATIONS = {
    "w8a8-int8-dynamic": "a8-int8-dynamic",
    "w8a8-int8-static": "a8-int8-static-minmax",
    "fp8-dynamic": "a8-fp8-dynamic",
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_quantized_checkpoints_compute_what_transformers_computes(name):
    """llm-compressor's W8A8 (INT8 per token, INT8 static per tensor) and FP8-dynamic checkpoints: lowbit
    quantizes the same inputs the same way as transformers + compressed-tensors (logits equal)."""
    path = DATA / name
    ours = lowbit.load(path, dtype=torch.float32, native_kernels=False).model
    schemes = {m.input_quantizer.scheme.label() for m in ours.modules() if hasattr(m, "input_quantizer")}
    assert schemes == {ACTIVATIONS[name]}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-6)
