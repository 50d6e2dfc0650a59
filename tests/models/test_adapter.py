import pytest
import torch
from torch import nn

from lowbit.models import (
    Architecture,
    LinearGroup,
    ModelAdapter,
    UnsupportedArchitectureError,
    register_architecture,
    set_weight,
    weight_of,
)
from lowbit.models.architectures import _REGISTRY
from tests.conftest import FAMILY_CONFIGS, build_family

# linears per block each family must expose
EXPECTED = {
    "llama": 7,
    "mistral": 7,
    "qwen2": 7,
    "qwen3": 7,
    "gemma": 7,
    "gemma2": 7,
    "gemma3_text": 7,
    "phi3": 4,
    "opt": 6,
    "gpt2": 4,
    "gpt_neox": 4,
    "bert": 6,
}


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_blocks_linears_and_groups_are_found(family):
    model = build_family(family)
    adapter = ModelAdapter(model)
    assert len(adapter) == 2
    linears = adapter.block_linears(1)
    assert len(linears) == EXPECTED[family]
    assert all(n.startswith(adapter.block_name(1) + ".") for n in linears)
    # every architecture group resolves to real linears of the block, and together they cover it
    groups = adapter.groups(0)
    covered = {n for g in groups for n in g.linears}
    relative = {n.removeprefix(adapter.block_name(0) + ".") for n in adapter.block_linears(0)}
    assert covered == relative
    for g in groups:
        if g.prev is not None:  # a foldable producer must match the group's input width
            width = {weight_of(m).shape[1] for m in g.linears.values()}
            produced = g.prev.weight.shape[0] if isinstance(g.prev, nn.Linear) else g.prev.weight.shape[-1]
            assert width == {produced}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_outside_linears(family):
    adapter = ModelAdapter(build_family(family))
    outside = adapter.outside_linears()
    if family == "bert":
        assert set(outside) == {"pooler.dense"}
    else:
        assert "lm_head" in outside
        name, head = adapter.lm_head()
        assert name == "lm_head" and head is outside["lm_head"]
        assert adapter.final_norm()[1] is not None


def test_grouped_query_attention_drops_the_v_to_o_fold():
    adapter = ModelAdapter(build_family("llama"))  # 4 heads, 2 kv heads: v_proj is half as wide as o_proj's input
    groups = {tuple(g.linears): g for g in adapter.groups(0)}
    assert groups[("self_attn.o_proj",)].prev is None
    assert groups[("mlp.down_proj",)].prev_name == "mlp.up_proj"


def test_gpt2_conv1d_weights_are_seen_as_out_by_in():
    model = build_family("gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc
    w = weight_of(c_fc)
    assert w.shape == (256, 64)  # [out=4*hidden, in=hidden], as nn.Linear would store it
    x = torch.randn(3, 64)
    assert torch.allclose(c_fc(x), x @ w.T + c_fc.bias, atol=1e-5)
    set_weight(c_fc, torch.zeros_like(w))
    assert torch.count_nonzero(c_fc.weight) == 0


def test_unknown_architecture_names_the_class_and_how_to_register():
    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "mystery"})()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(UnsupportedArchitectureError, match=r"Mystery.*model_type='mystery'.*register_architecture"):
        ModelAdapter(Mystery())


def test_registering_a_new_architecture():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "custom_test_arch"})()
            self.stack = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(3)])

    arch = Architecture(
        name="custom",
        model_types=("custom_test_arch",),
        block_paths=("stack",),
        groups=(LinearGroup(("1",), prev="0"),),
    )
    try:
        register_architecture(arch)
        with pytest.raises(ValueError, match="already registered"):
            register_architecture(arch)
        adapter = ModelAdapter(Custom())
        assert len(adapter) == 3
        assert list(adapter.block_linears(2)) == ["stack.2.1"]
        assert adapter.groups(0)[0].prev_name == "0"
    finally:
        _REGISTRY.pop("custom_test_arch", None)


def test_model_kind_from_architectures_or_type():
    import transformers

    from lowbit.models.loading import model_kind

    cfg = transformers.LlamaConfig()
    assert cfg.architectures is None and model_kind(cfg) == "causal-lm"
    assert model_kind(transformers.BertConfig()) == "encoder"
    cfg.architectures = ["LlamaModel"]
    assert model_kind(cfg) == "encoder"
    cfg.architectures = ["LlamaForCausalLM"]
    assert model_kind(cfg) == "causal-lm"
