"""The packed runtime: lowbit.load keeps quantized layers packed; every format reloads losslessly."""

from pathlib import Path

import pytest
import torch
import transformers

import lowbit
from lowbit.algorithms import GPTQ, HQQ, RTN
from lowbit.api import quantize_checkpoint
from lowbit.formats import Quantizer, make_format
from lowbit.pipeline import PipelineOptions
from lowbit.runtime import PackedLinear
from lowbit.runtime.packed_linear import int4_codes, int4_layout
from tests.conftest import build_family, random_ids, save_tiny_lm

OPTIONS = PipelineOptions(progress=False, sanity_samples=0)


def test_int4_layout_is_torchs():
    codes = torch.randint(0, 16, (96, 384), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    assert torch.equal(int4_layout(codes), torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
    assert torch.equal(int4_codes(int4_layout(codes), 384), codes.to(torch.uint8))


@pytest.mark.parametrize(
    "fmt",
    [
        dict(format="int4", group_size=32),
        dict(format="int4", group_size=128, symmetric=False),
        dict(format="int4", group_size=-1),
        dict(format="int8", group_size=-1),
        dict(format="int3", group_size=32),
        dict(format="nf4"),
        dict(format="nvfp4"),
    ],
)
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_packed_linear_computes_the_dequantized_layer(fmt, rows):
    """Against F.linear with the dequantized weight (Quantizer.dequantize, the reference): exact on the dequantize
    path, within bfloat16 rounding on the weight-only kernels (which compute in bfloat16)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen)
    fmt = dict(fmt)
    q = Quantizer(make_format(fmt.pop("format"), **fmt)).quantize(w)
    bias = torch.randn(64, generator=gen)
    layer = PackedLinear(q, bias, torch.float32)
    x = torch.randn(rows, 256, generator=gen)
    expected = torch.nn.functional.linear(x, Quantizer(q.spec).dequantize(q), bias)
    torch.testing.assert_close(layer.dense_weight(), Quantizer(q.spec).dequantize(q), rtol=0, atol=0)
    if layer.kernel == "dequantize":
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    else:  # bfloat16 inputs and scales: relative error of a few 2^-9
        assert float((layer.forward_native(x).float() + bias - expected).norm() / expected.norm()) < 1e-2
    exact = PackedLinear(q, bias, torch.float32, native=False)
    torch.testing.assert_close(exact(x), expected, rtol=1e-5, atol=1e-5)
    back = layer.quantized()
    torch.testing.assert_close(Quantizer(q.spec).dequantize(back), Quantizer(q.spec).dequantize(q), rtol=0, atol=0)


def test_hqq_fractional_zero_points_run_in_the_int4_kernel():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    step = HQQ(format="int4", group_size=64)
    from lowbit.algorithms.hqq import hqq_quantize

    q = hqq_quantize(w, Quantizer(step.config.spec), step.config)
    assert not torch.equal(q.zero, q.zero.round())
    layer = PackedLinear(q, None, torch.float32)
    assert layer.kernel == "int4"
    x = torch.randn(3, 128)
    expected = x @ Quantizer(q.spec).dequantize(q).T
    assert float((layer.forward_native(x).float() - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.parametrize("save_format", ["compressed-tensors", "lowbit"])
def test_load_keeps_layers_packed_and_computes_the_fake_quant_logits(tmp_path, save_format):
    model = save_tiny_lm(tmp_path / "m")
    step = GPTQ(format="int4", group_size=32, symmetric=False)
    kw = dict(n_samples=8, seq_len=64, options=OPTIONS)
    packed = quantize_checkpoint(model, [step], tmp_path / "p", save_format=save_format, **kw)
    fake = quantize_checkpoint(model, [step], tmp_path / "f", save_format="fake", **kw)
    loaded = lowbit.load(packed.out_dir, dtype=torch.float32, native_kernels=False)
    layers = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14
    reference = transformers.AutoModelForCausalLM.from_pretrained(fake.out_dir, dtype=torch.float32).eval()
    for name, module in loaded.model.named_modules():
        if isinstance(module, PackedLinear):  # lossless: exactly the fake-quant checkpoint's weights
            torch.testing.assert_close(module.dense_weight(), reference.get_submodule(name).weight, rtol=0, atol=0)
    ids = torch.randint(0, 4000, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("fmt", ["nf4", "fp6", "ternary", "binary", "lut", "int3-hqq", "gptq-g_idx", "mxfp4", "fp8"])
def test_every_format_round_trips_losslessly_through_lowbits_layout(tmp_path, fmt):
    model = build_family("llama")
    ids = random_ids(8, 32)
    steps = {
        "nf4": RTN(format="nf4", group_size=32),
        "fp6": RTN(format="fp6", group_size=32),
        "ternary": RTN(format="ternary"),
        "binary": RTN(format="binary"),
        "lut": RTN(format={"kind": "lut", "lut": [-1.0, -0.3, 0.0, 0.25, 1.0]}, group_size=32),
        "int3-hqq": HQQ(format="int3", group_size=32),
        "gptq-g_idx": GPTQ(format="int4", group_size=16, static_groups=False),
        "mxfp4": RTN(format="mxfp4"),
        "fp8": RTN(format="fp8"),
    }
    result = lowbit.quantize(model, steps[fmt], calibration=ids, progress=False)
    result.save(tmp_path / "out", save_format="lowbit")
    loaded = lowbit.load(tmp_path / "out", dtype=torch.float32, native_kernels=False)
    for name, q in result.quantized.items():
        back = loaded.model.get_submodule(name).quantized()
        assert torch.equal(back.codes, q.codes), name
        for a, b in (
            (back.scale, q.scale),
            (back.zero, q.zero),
            (back.global_scale, q.global_scale),
            (back.g_idx, q.g_idx),
        ):
            assert (a is None) == (b is None) and (a is None or torch.equal(a.float(), b.float())), name
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_in_memory_save_picks_compressed_tensors_when_it_can(tmp_path):
    ids = random_ids(8, 32)
    result = lowbit.quantize(build_family("llama"), RTN(format="int4", group_size=32), progress=False)
    result.save(tmp_path / "ct")
    config = (tmp_path / "ct" / "config.json").read_text()
    assert '"quant_method": "compressed-tensors"' in config
    nf4 = lowbit.quantize(build_family("llama"), RTN(format="nf4", group_size=32), calibration=ids, progress=False)
    nf4.save(tmp_path / "nf4")
    assert '"quant_method": "lowbit"' in (tmp_path / "nf4" / "config.json").read_text()
    assert lowbit.load(tmp_path / "ct").model is not None


def _mapped_file(address: int) -> str | None:
    """The file whose memory map holds ``address`` in this process (Linux), if any."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        start, end = (int(a, 16) for a in parts[0].split("-"))
        if start <= address < end:
            return parts[5] if len(parts) > 5 else None
    return None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="Linux only")
def test_load_leaves_the_input_embeddings_mapped_from_the_file(tmp_path):
    model = save_tiny_lm(tmp_path / "m")
    packed = quantize_checkpoint(model, [RTN(format="int4", group_size=32)], tmp_path / "p", options=OPTIONS)
    loaded = lowbit.load(packed.out_dir, dtype=torch.float32)
    weight = loaded.model.get_input_embeddings().weight
    assert (_mapped_file(weight.data_ptr()) or "").endswith(".safetensors")
    assert _mapped_file(loaded.model.lm_head.weight.data_ptr()) is None or not _mapped_file(
        loaded.model.lm_head.weight.data_ptr()
    ).endswith(".safetensors")
    original = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    torch.testing.assert_close(weight, original.get_input_embeddings().weight, rtol=0, atol=0)
