"""lowbit's compressed-tensors export against the real consumer: transformers with the compressed-tensors package.

Each export must load with ``AutoModelForCausalLM.from_pretrained`` (the loader decompresses the packed weights
itself) and compute the same logits as lowbit's fake-quantized checkpoint of the same run.
"""

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.algorithms import GPTQ, RTN
from lowbit.api import quantize_checkpoint
from lowbit.export.compressed_tensors import CompressedTensorsLayout
from lowbit.export.layouts import ExportError
from lowbit.formats import Quantizer, make_format
from lowbit.pipeline import PipelineOptions
from tests.conftest import save_tiny_lm

pytest.importorskip("compressed_tensors")

OPTIONS = PipelineOptions(progress=False, sanity_samples=2, sanity_generate=2)

FORMATS = {
    "int4-sym-g32": dict(format="int4", group_size=32),
    "int4-asym-g32": dict(format="int4", group_size=32, symmetric=False),
    "int8-sym-channel": dict(format="int8", group_size=-1),
    "int8-asym-g64": dict(format="int8", group_size=64, symmetric=False),
    "int3-sym-g32": dict(format="int3", group_size=32),
    "int2-asym-channel": dict(format="int2", group_size=-1, symmetric=False),
    "fp8-channel": dict(format="fp8"),
    "nvfp4": dict(format="nvfp4"),
    "mxfp4": dict(format="mxfp4"),
}


def _load(path, spec):
    """transformers' own loading. Its default path (compressed modules, decompressed at the first forward) fails on
    asymmetric packed zero-points (transformers 5.24 sizes them unpacked) and gives FP4 layers bf16 weights in an fp32
    model; its dequantize path (dense weights at load) reads both."""
    kwargs = {}
    if spec.has_zero_point or (spec.kind == "fp" and spec.bits == 4):
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def _close(theirs, ours, spec, ids):
    """Weights equal to lowbit's but for the rounding of the loader's arithmetic: exact where it computes in the
    checkpoint's fp32 (integer formats, FP8), within bf16 rounding where compressed-tensors computes FP4 scales in
    bf16. Logits within 1e-4 (2e-3 for FP4)."""
    fp4 = spec.kind == "fp" and spec.bits == 4
    with torch.no_grad():  # the default path decompresses at the first forward
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    loaded = dict(theirs.named_parameters())
    for name, wa in ours.named_parameters():
        torch.testing.assert_close(loaded[name].float(), wa, rtol=2**-8 if fp4 else 0.0, atol=1e-7, msg=name)
    torch.testing.assert_close(b, a, atol=2e-3 if fp4 else 1e-4, rtol=1e-3 if fp4 else 1e-4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("m") / "tiny", hidden=64, intermediate=128)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_transformers_loads_the_export_and_computes_lowbits_logits(model_dir, tmp_path, name):
    step = RTN(**FORMATS[name])
    ct = quantize_checkpoint(model_dir, [step], tmp_path / "ct", options=OPTIONS, save_format="compressed-tensors")
    fake = quantize_checkpoint(model_dir, [step], tmp_path / "fake", options=OPTIONS, save_format="fake")
    config = ct.out_dir / "config.json"
    assert '"quant_method": "compressed-tensors"' in config.read_text()
    assert ct.report.size_on_disk_bytes < fake.report.size_on_disk_bytes
    ours = transformers.AutoModelForCausalLM.from_pretrained(fake.out_dir, dtype=torch.float32).eval()
    theirs = _load(ct.out_dir, step.config.spec)
    _close(theirs, ours, step.config.spec, torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0)))


def test_gptq_export_loads_and_matches(model_dir, tmp_path):
    step = GPTQ(format="int4", group_size=32, symmetric=False)
    kw = dict(n_samples=8, seq_len=64, options=OPTIONS)
    ct = quantize_checkpoint(model_dir, [step], tmp_path / "ct", save_format="compressed-tensors", **kw)
    fake = quantize_checkpoint(model_dir, [step], tmp_path / "fake", save_format="fake", **kw)
    ours = transformers.AutoModelForCausalLM.from_pretrained(fake.out_dir, dtype=torch.float32).eval()
    theirs = _load(ct.out_dir, step.config.spec)
    _close(theirs, ours, step.config.spec, torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(1)))


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, 8),
    rows=st.integers(1, 20),
    groups=st.integers(1, 3),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_tensors_read_back_to_the_same_codes_and_parameters(bits, rows, groups, symmetric, seed):
    if symmetric and bits == 1:
        symmetric = False
    spec = make_format("int", bits=bits, group_size=8, symmetric=symmetric)
    w = torch.randn(rows, 8 * groups, generator=torch.Generator().manual_seed(seed))
    q = Quantizer(spec).quantize(w)
    layout = CompressedTensorsLayout()
    back = layout.read_layer(layout.layer_tensors(q, torch.float32), spec)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scale, q.scale)
    assert (back.zero is None) == (q.zero is None) and (q.zero is None or torch.equal(back.zero, q.zero))


def test_formats_compressed_tensors_cannot_hold_are_refused_before_any_work(model_dir, tmp_path):
    for fmt in ("nf4", "fp6", "ternary"):
        with pytest.raises(ExportError, match="compressed-tensors has no format"):
            quantize_checkpoint(
                model_dir,
                [RTN(format=fmt, group_size=32)],
                tmp_path / fmt,
                options=OPTIONS,
                save_format="compressed-tensors",
            )
        assert not (tmp_path / fmt).exists()
    from lowbit.algorithms import HQQ

    with pytest.raises(ExportError, match="fractional zero-points"):
        quantize_checkpoint(
            model_dir, [HQQ(format="int4", group_size=32)], tmp_path / "h", save_format="compressed-tensors"
        )
    with pytest.raises(ExportError, match="static_groups"):
        quantize_checkpoint(
            model_dir,
            [GPTQ(format="int4", group_size=32, static_groups=False)],
            tmp_path / "g",
            save_format="compressed-tensors",
        )
