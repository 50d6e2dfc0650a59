import pytest
import torch

import lowbit
from lowbit.algorithms import AWQ, GPTQ
from lowbit.algorithms.folding import FoldError, divide_producer_outputs, multiply_consumer_inputs
from lowbit.formats import Quantizer, make_format
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


def test_awq_chooses_the_scales_a_brute_force_search_finds():
    """An independent search on block 0's q/k/v group: the candidate scales written out from the paper
    (s = mean|x|^a / mean|w|^(1-a), normalised), each scored by running the layers on the captured inputs:
    sum_l ||X W_l^T - (X/s) Q(W_l s)^T||^2. AWQ's fold must be the winner's scale."""
    ids = random_ids(8, 32, seed=5)
    model = _outlier_llama()
    block = model.model.layers[0]
    captured = []
    hook = block.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    X = captured[0].reshape(-1, 64).double()
    linears = [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]
    weights = [m.weight.detach().double().clone() for m in linears]
    norm_before = block.input_layernorm.weight.detach().clone()

    q = Quantizer(make_format("int3", group_size=32))
    x_mean = X.abs().mean(0)
    w = torch.cat(weights)
    groups = w.abs().reshape(w.shape[0], -1, 32)
    w_mean = (groups / groups.amax(-1, keepdim=True)).reshape(w.shape).mean(0)
    best, best_err = None, float("inf")
    for i in range(20):
        a = i / 20
        s = (x_mean**a / w_mean.clamp(min=1e-4) ** (1 - a)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for W in weights:
            Wq = q.dequantize(q.quantize((W * s).float())).double()
            err += float(((X @ W.T) - (X / s) @ Wq.T).pow(2).sum())
        if err < best_err:
            best, best_err = s, err

    lowbit.quantize(model, AWQ(format="int3", group_size=32, clip_search=False, quantize=False), calibration=ids)
    folded = norm_before / block.input_layernorm.weight.detach()
    torch.testing.assert_close(folded.double(), best, rtol=2e-3, atol=0)
