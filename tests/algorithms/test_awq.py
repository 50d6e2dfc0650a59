import pytest
import torch

import lowbit
from lowbit.algorithms import AWQ, GPTQ
from lowbit.algorithms.folding import FoldError, divide_producer_outputs, multiply_consumer_inputs
from tests.conftest import build_family, random_ids


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("family", ["llama", "gemma", "opt", "qwen2", "bert", "gpt2"])
def test_awq_scales_leave_the_full_precision_function_unchanged(family):
    model = build_family(family)
    ids = random_ids(4, 16)
    before = _out(model, ids)
    weights_before = {n: p.clone() for n, p in model.named_parameters()}
    lowbit.quantize(model, AWQ(format="int3", group_size=32, clip_search=False, quantize=False), calibration=ids)
    after = _out(model, ids)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights_before[n])]
    assert changed, "AWQ should have moved scales into the weights"


def test_folding_into_a_gemma_norm_respects_its_offset():
    model = build_family("gemma")
    block = model.model.layers[0]
    x = torch.randn(2, 5, 64)
    y = block.self_attn.q_proj(block.input_layernorm(x))
    s = torch.rand(64) + 0.5
    divide_producer_outputs(block.input_layernorm, s, norm_offset=1.0)
    multiply_consumer_inputs([block.self_attn.q_proj], s)
    assert torch.allclose(block.self_attn.q_proj(block.input_layernorm(x)), y, atol=1e-5)


def test_folding_refuses_a_producer_of_the_wrong_width():
    with pytest.raises(FoldError, match="size 8"):
        divide_producer_outputs(torch.nn.LayerNorm(4), torch.ones(8))


def _outlier_llama():
    model = build_family("llama")
    with torch.no_grad():  # salient input channels, the situation AWQ is designed for
        for block in model.model.layers:
            block.input_layernorm.weight[:4] = 20.0
            block.post_attention_layernorm.weight[:4] = 20.0
    return model


def test_awq_beats_rtn_on_salient_channels():
    ids = random_ids(8, 32, seed=1)
    model = _outlier_llama()
    res = lowbit.quantize(model, AWQ(format="int3", group_size=32), calibration=ids)
    layers = [r for r in res.report.layers if r.output_error is not None]
    assert len(layers) == 14
    awq = sum(r.output_error for r in layers)
    rtn = sum(r.output_error_rtn for r in layers)
    assert awq < rtn


def test_awq_then_gptq_leaves_rounding_to_gptq():
    ids = random_ids(8, 32, seed=2)
    model = _outlier_llama()
    ref = _outlier_llama()
    res = lowbit.quantize(
        model, [AWQ(format="int4", group_size=32), GPTQ(format="int4", group_size=32)], calibration=ids
    )
    assert {r.method for r in res.report.layers} == {"gptq"}
    assert len(res.report.layers) == 14
    # the quantized model stays close to the original
    rel = (_out(model, ids) - _out(ref, ids)).pow(2).mean() / _out(ref, ids).pow(2).mean()
    assert rel < 0.05
