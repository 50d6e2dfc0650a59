"""The report's numbers against direct computations on the model itself."""

import pytest
import torch

import lowbit
from lowbit.algorithms import AWQ, GPTQ, RTN
from tests.conftest import build_family, random_ids


def _first_block_inputs(model, ids):
    """The calibration inputs (float64, one row per token) of block 0's linears, from the original model."""
    block = model.model.layers[0]
    inputs, hooks = {}, []
    for rel, mod in block.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(lambda _m, a, n=rel: inputs.setdefault(n, a[0].detach())))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {n: x.reshape(-1, x.shape[-1]).double() for n, x in inputs.items()}


def _weights(model):
    return {
        rel: m.weight.detach().double().clone()
        for rel, m in model.model.layers[0].named_modules()
        if isinstance(m, torch.nn.Linear)
    }


# the norm whose weight absorbed AWQ's scale for each layer's input (o_proj: none, v_proj is narrower under GQA)
_PRODUCER = {
    "self_attn.q_proj": "input_layernorm",
    "self_attn.k_proj": "input_layernorm",
    "self_attn.v_proj": "input_layernorm",
    "self_attn.o_proj": None,
    "mlp.gate_proj": "post_attention_layernorm",
    "mlp.up_proj": "post_attention_layernorm",
}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_reported_output_errors_equal_a_direct_computation(method):
    """Output error = ||X W^T - X W_q^T||^2 / ||X W^T||^2 on the layer's calibration inputs X, and RTN's likewise
    with RTN's weights. GPTQ without true-sequential, and AWQ without clipping (its scales leave the function
    unchanged until it rounds, at the end), collect every layer's inputs from the full-precision block, so X is
    what the original model feeds the layer. For AWQ the layer's
    input was divided by the scale s folded into its norm: it computes (X/s) W_q^T."""
    ids = random_ids(4, 32, seed=7)
    model = build_family("llama")
    X, W = _first_block_inputs(model, ids), _weights(model)
    norms = {
        n: model.model.layers[0].get_submodule(n).weight.detach().double().clone()
        for n in set(filter(None, _PRODUCER.values()))
    }
    step = (
        GPTQ(format="int3", group_size=32, true_sequential=False)
        if method == "gptq"
        else AWQ(format="int3", group_size=32, clip_search=False)
    )
    res = lowbit.quantize(model, step, calibration=ids, progress=False)
    rtn_model = build_family("llama")
    lowbit.quantize(rtn_model, RTN(format="int3", group_size=32), progress=False)
    rtn, quantized = _weights(rtn_model), _weights(model)
    rows = {
        r.name.removeprefix("model.layers.0."): r for r in res.report.layers if r.name.startswith("model.layers.0.")
    }
    layers = list(_PRODUCER) + (["mlp.down_proj"] if method == "gptq" else [])
    for rel in layers:
        x, w = X[rel], W[rel]
        s = torch.ones(x.shape[-1], dtype=torch.float64)
        if method == "awq" and _PRODUCER[rel] is not None:
            s = norms[_PRODUCER[rel]] / model.model.layers[0].get_submodule(_PRODUCER[rel]).weight.detach().double()
        out = x @ w.T
        base = float(out.pow(2).sum())
        expected = float((out - (x / s) @ quantized[rel].T).pow(2).sum()) / base
        expected_rtn = float((out - x @ rtn[rel].T).pow(2).sum()) / base
        assert rows[rel].output_error == pytest.approx(expected, rel=2e-3), rel
        assert rows[rel].output_error_rtn == pytest.approx(expected_rtn, rel=2e-3), rel
