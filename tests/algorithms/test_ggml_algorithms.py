"""GPTQ, AWQ and HQQ quantizing directly onto llama.cpp's grids."""

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.algorithms import AWQ, HQQ, StepConfigError
from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.hessian import output_error
from lowbit.algorithms.hqq import HQQConfig, hqq_quantize
from lowbit.formats import QParams, Quantizer, make_format, to_ggml_bytes
from lowbit.formats.ggml_types import GGML_TYPES
from tests.algorithms.test_gptq import layer
from tests.conftest import random_ids

WITH_MINS = ["q4_1", "q5_1", "q2_k", "q4_k", "q5_k"]


def reencoded(q: Quantizer, qt) -> torch.Tensor:
    """The codes of the dequantized weight under the tensor's own parameters (per column when
    groups follow act-order)."""
    deq = q.dequantize(qt)
    p = qt.params()
    if qt.g_idx is None:
        return q.encode(q.group_view(deq), p).reshape(deq.shape)
    cols = deq.shape[1]
    per_col = p.select(qt.g_idx.long())
    per_col = QParams(**{n: v.reshape(-1, cols) for n, v in per_col.grouped()})
    return q.encode(deq, per_col)


@settings(max_examples=16, deadline=None)
@given(
    seed=st.integers(0, 1000),
    name=st.sampled_from(list(GGML_TYPES)),
    clip=st.sampled_from(["minmax", "llama.cpp"]),
    act_order=st.booleans(),
    static_groups=st.booleans(),
)
def test_gptq_output_error_is_at_most_rtn_and_its_codes_are_on_the_grid(seed, name, clip, act_order, static_groups):
    """Static groups: every row's parameters up front (whole super-blocks); dynamic: a K-quant's
    parameters per super-block when the walk reaches it."""
    q = Quantizer(make_format(name, clip=clip))
    W, H, _ = layer(seed)
    res = gptq_quantize(W, H, q, block_size=64, act_order=act_order, static_groups=static_groups)
    qt = res.qtensor
    deq = q.dequantize(qt)
    assert output_error(W - deq, H) <= output_error(W - q.dequantize(q.quantize(W)), H)
    assert torch.equal(reencoded(q, qt), qt.codes)
    # the walk's own loss is the error of the tensor it returns (super-scales included)
    Hd = H.clone()
    Hd.diagonal().add_(res.dampening * H.diagonal().mean())
    assert res.loss == pytest.approx(output_error(W - deq, Hd), rel=1e-4)
    assert (qt.g_idx is not None) == (act_order and not static_groups)
    if qt.g_idx is None:  # packs losslessly: ggml's own decoder gives the same weights
        gguf = pytest.importorskip("gguf")
        decoded = gguf.quants.dequantize(to_ggml_bytes(qt), gguf.GGMLQuantizationType[name.upper()])
        assert np.array_equal(decoded, deq.numpy())


@pytest.mark.parametrize("name", list(GGML_TYPES))
def test_gptq_beats_rtn_on_every_llama_cpp_format(name):
    """Every format, with lowbit's default (act-order, static groups) and with parameters found as
    the walk goes (no act-order, dynamic groups: per super-block for the K-quants)."""
    q = Quantizer(make_format(name))
    W, H, _ = layer(7)
    rtn = output_error(W - q.dequantize(q.quantize(W)), H)
    for act_order, static_groups in [(True, True), (False, False)]:
        qt = gptq_quantize(W, H, q, act_order=act_order, static_groups=static_groups).qtensor
        assert output_error(W - q.dequantize(qt), H) < rtn
        assert torch.equal(reencoded(q, qt), qt.codes)


def test_dynamic_k_quant_parameters_come_from_the_updated_super_block():
    """Without act-order and static groups, the super-block's parameters are those of the weights
    as GPTQ has updated them when it reaches the super-block (not of the original weights)."""
    q = Quantizer(make_format("q4_k"))
    W, H, _ = layer(3, cols=512)
    static = gptq_quantize(W, H, q, static_groups=True).qtensor
    dynamic = gptq_quantize(W, H, q, static_groups=False).qtensor
    original = q.quantize(W)
    assert torch.equal(static.super_scale, original.super_scale) and torch.equal(static.scale, original.scale)
    # the first super-block sees no feedback yet; the second one does
    assert torch.equal(dynamic.super_scale[:, 0], original.super_scale[:, 0])
    assert not torch.equal(dynamic.super_scale[:, 1], original.super_scale[:, 1])


def _llama(hidden=256, seed=0):
    """A one-block Llama whose rows split into K-quant super-blocks, with salient input channels."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[:4] = 20.0
            block.post_attention_layernorm.weight[:4] = 20.0
    return model


# small search grids: these check that AWQ works on the formats, not its search
FAST = {"grid": 5, "clip_grid": 5}


@pytest.mark.parametrize("name", [n for n in GGML_TYPES if n != "q4_0"])  # q4_0: the test below
def test_awq_on_llama_cpp_formats_exports_exactly_the_model_it_leaves(name):
    gguf = pytest.importorskip("gguf")
    ids = random_ids(8, 32, seed=1)
    model = _llama()
    res = lowbit.quantize(model, AWQ(format=name, **FAST), calibration=ids, keep_codes=True)
    layers = [r for r in res.report.layers if r.output_error is not None]
    assert len(layers) == 7 and {r.format for r in res.report.layers} == {name}
    modules = dict(model.named_modules())
    for layer_name, qt in res.quantized.items():
        decoded = gguf.quants.dequantize(to_ggml_bytes(qt), gguf.GGMLQuantizationType[name.upper()])
        assert np.array_equal(decoded, modules[layer_name].weight.detach().float().numpy())
    if name in ("q2_k", "q3_k"):  # at 2-3 bits the salient channels make AWQ pay off
        assert sum(r.output_error for r in layers) < sum(r.output_error_rtn for r in layers)


def test_awq_on_q4_0_is_awq_on_the_same_integer_grid():
    ids = random_ids(8, 32, seed=2)
    a, b = _llama(), _llama()
    lowbit.quantize(a, AWQ(format="q4_0", **FAST), calibration=ids)
    lowbit.quantize(b, AWQ(format="int4", group_size=32, **FAST), calibration=ids)
    for (n, p), (_, r) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, r), n


@pytest.mark.parametrize("name", WITH_MINS)
def test_hqq_takes_its_zero_point_as_the_stored_min(name):
    torch.manual_seed(0)
    W = torch.randn(128, 512)
    W[::9, ::17] *= 10  # outliers
    cfg = HQQConfig(format=name)
    q = Quantizer(cfg.spec)
    qt = hqq_quantize(W, q, cfg)
    hqq, rtn = q.dequantize(qt), q.dequantize(q.quantize(W))
    for p in (0.7, 1.0):  # the norms HQQ targets, against lowbit's min-max rule on the same grid
        assert ((W - hqq).abs() ** p).mean() < ((W - rtn).abs() ** p).mean()
    assert torch.equal(reencoded(q, qt), qt.codes)
    to_ggml_bytes(qt)  # every stored min is one llama.cpp can hold (fp16, or 4-/6-bit codes)
    if qt.super_min is None:  # fp16 mins, moved by the optimisation away from the min-max start
        assert torch.equal(qt.zero, qt.zero.half().float())
        assert not torch.equal(qt.zero, (-W.reshape(128, 16, 32).amin(-1)).half().float())


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q8_0", "q3_k", "q6_k"])
def test_hqq_refuses_the_symmetric_llama_cpp_formats_by_name(name):
    with pytest.raises(StepConfigError, match=rf"asymmetric integer format, got {name} .*q4_1, q5_1, q2_k, q4_k, q5_k"):
        HQQ(format=name)
