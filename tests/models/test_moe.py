"""Mixture-of-Experts: experts quantized per projection, routers kept, empty experts handled."""

import pytest
import torch
import transformers

import lowbit
from lowbit.algorithms import GPTQ
from lowbit.models import ModelAdapter, UnfusedExperts
from tests.conftest import random_ids

MOE = {
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
    ),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(MOE[name]()).eval()


@pytest.mark.parametrize("family", sorted(MOE))
def test_unfused_experts_compute_the_same_function_and_fuse_back(family):
    model = build(family)
    ids = random_ids(2, 12)
    ref = model(input_ids=ids).logits
    fused_type = type(model.model.layers[0].mlp.experts)
    adapter = ModelAdapter(model)
    assert adapter.unfuse_experts() == 2
    assert isinstance(model.model.layers[0].mlp.experts, UnfusedExperts)
    assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)
    linears = adapter.block_linears(0)
    spec = adapter.arch.moe
    assert f"model.layers.0.mlp.experts.3.{spec.down}" in linears
    assert not any(n.endswith("mlp.gate") for n in linears)  # the router is not a Linear: kept in full precision
    adapter.refuse_experts()
    assert type(model.model.layers[0].mlp.experts) is fused_type


def _force_expert_unused(model, expert=3):
    def hook(_module, _inputs, output):
        logits, scores, indices = output
        indices = torch.where(indices == expert, (indices + 1) % expert, indices)
        return logits, scores, indices

    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


def test_gptq_on_moe_reports_tokens_per_expert_and_falls_back_for_an_unused_expert():
    model = build("mixtral")
    _force_expert_unused(model)
    ids = random_ids(8, 32)
    res = lowbit.quantize(model, GPTQ(format="int4", group_size=32, fallback="hqq", symmetric=False), calibration=ids)
    tokens = res.report.extra["tokens_per_expert"]
    assert set(tokens) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert all(t[3] == 0 and sum(t) == 8 * 32 * 2 for t in tokens.values())
    layers = {r.name: r for r in res.report.layers}
    unused = layers["model.layers.0.mlp.experts.3.w2"]
    assert unused.method == "hqq" and "0 calibration tokens" in unused.note
    assert layers["model.layers.0.mlp.experts.0.w2"].method == "gptq"
    assert len([n for n in layers if ".experts." in n]) == 2 * 4 * 3
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert torch.isfinite(model.model.layers[0].mlp.experts.down_proj).all()
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_routing_every_token_through_every_expert_gives_each_one_statistics():
    model = build("mixtral")
    before = model.model.layers[0].mlp.gate.weight.clone()
    _force_expert_unused(model)
    ids = random_ids(8, 32)
    res = lowbit.quantize(model, GPTQ(format="int4", group_size=32), calibration=ids, moe_route_all=True)
    layers = {r.name: r for r in res.report.layers}
    assert layers["model.layers.0.mlp.experts.3.w2"].method == "gptq"
    assert torch.equal(model.model.layers[0].mlp.gate.weight, before)


def test_streamed_moe_checkpoint_round_trips(tmp_path):
    from lowbit.algorithms import RTN
    from lowbit.api import quantize_checkpoint
    from lowbit.pipeline import PipelineOptions

    model = build("mixtral")
    model.save_pretrained(tmp_path / "m")
    run = quantize_checkpoint(
        tmp_path / "m",
        [RTN(format="int4", group_size=32)],
        tmp_path / "out",
        options=PipelineOptions(progress=False, sanity_samples=0),
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(run.out_dir)
    in_memory = build("mixtral")
    lowbit.quantize(in_memory, RTN(format="int4", group_size=32))
    ids = random_ids(2, 12)
    assert torch.allclose(reloaded(input_ids=ids).logits, in_memory(input_ids=ids).logits, atol=1e-5)
