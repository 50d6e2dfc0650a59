"""QuaRot: the rotated model computes the same function (per architecture family, in memory and
streamed from disk, tied heads included), each rotation is the one the paper defines, the online
Hadamard survives saving and loading, and rotated W4A4 beats plain W4A4 where outliers exist."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import lowbit
from lowbit.algorithms.hadamard import OnlineRotation, Rotation, online_rotation_of
from lowbit.algorithms.quarot import RotationError
from lowbit.pipeline.directory import quantize_directory
from lowbit.recipe import as_recipe
from tests.conftest import FAMILY_CONFIGS, build_family, random_ids, save_tiny_lm

ROTATABLE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"]


def _randomise(model, seed=1):
    """Norm weights and biases away from their initial values, so that fusing them is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def _close(a, b, tol=1e-4):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("family", ROTATABLE)
def test_full_precision_function_unchanged(family):
    model = _randomise(build_family(family).float())
    reference = copy.deepcopy(model)
    ids = random_ids(2, 12, vocab=model.config.vocab_size, seed=3)
    lowbit.quantize(model, [{"quarot": {}}], progress=False)
    assert _close(_logits(model, ids), _logits(reference, ids))
    down = model.model.layers[0].mlp.down_proj
    assert online_rotation_of(down) is not None
    # the weights really changed: a no-op would pass the check above too
    assert not torch.allclose(down.weight, reference.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("rotation", ["hadamard", "orthogonal"])
def test_widths_that_are_not_powers_of_two(rotation):
    # hidden 96 = 32 x 3, head size 24 = 8 x 3, intermediate 80 = 16 x 5
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=96,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = _randomise(transformers.LlamaForCausalLM(config).eval())
    reference = copy.deepcopy(model)
    ids = random_ids(2, 12, seed=4)
    lowbit.quantize(model, [{"quarot": {"rotation": rotation, "seed": 7}}], progress=False)
    assert _close(_logits(model, ids), _logits(reference, ids))


def test_each_rotation_is_the_papers():
    """Block-level definitions, checked on the matrices: readers ``W diag(g) Q``, writers ``Q^T W``,
    values ``H^T W_v`` per head and ``W_o H`` per head, ``down_proj`` ``Q^T W R``, embeddings ``E Q``,
    head ``W diag(g_final) Q``."""
    model = _randomise(build_family("llama").float())
    original = copy.deepcopy(model)
    lowbit.quantize(model, [{"quarot": {"seed": 3}}], progress=False)
    n, d = model.config.hidden_size, model.config.head_dim
    q = Rotation(n, "hadamard", 3).matrix(torch.float32)
    h = Rotation(d, "hadamard", 4).matrix(torch.float32)
    r = Rotation(model.config.intermediate_size, "hadamard", 5).matrix(torch.float32)
    a, b = original.model.layers[1], model.model.layers[1]
    g_attn, g_mlp = a.input_layernorm.weight, a.post_attention_layernorm.weight
    torch.testing.assert_close(b.self_attn.q_proj.weight, a.self_attn.q_proj.weight * g_attn @ q, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.mlp.up_proj.weight, a.mlp.up_proj.weight * g_mlp @ q, atol=1e-5, rtol=0)
    heads_v = torch.block_diag(*[h] * (a.self_attn.v_proj.weight.shape[0] // d))
    torch.testing.assert_close(
        b.self_attn.v_proj.weight, heads_v.T @ (a.self_attn.v_proj.weight * g_attn) @ q, atol=1e-5, rtol=0
    )
    heads_o = torch.block_diag(*[h] * (a.self_attn.o_proj.weight.shape[1] // d))
    torch.testing.assert_close(b.self_attn.o_proj.weight, q.T @ a.self_attn.o_proj.weight @ heads_o, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.mlp.down_proj.weight, q.T @ a.mlp.down_proj.weight @ r, atol=1e-5, rtol=0)
    assert torch.equal(b.input_layernorm.weight, torch.ones(n))
    torch.testing.assert_close(
        model.model.embed_tokens.weight, original.model.embed_tokens.weight @ q, atol=1e-5, rtol=0
    )
    g = original.model.norm.weight
    torch.testing.assert_close(model.lm_head.weight, original.lm_head.weight * g @ q, atol=1e-5, rtol=0)
    # the online rotation is R itself, applied to down_proj's input
    x = torch.randn(3, r.shape[0])
    torch.testing.assert_close(online_rotation_of(b.mlp.down_proj)(x), x @ r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gemma2", "opt", "gpt2", "bert"])
def test_families_a_rotation_would_break_are_refused(family):
    model = build_family(family).float()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(RotationError):
        lowbit.quantize(model, [{"quarot": {}}], progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_rotation_must_come_first():
    model = build_family("llama").float()
    with pytest.raises(ValueError, match="must come first"):
        lowbit.quantize(model, [{"rtn": {"format": "int8", "group_size": -1}}, {"quarot": {}}], progress=False)


def test_a_tied_head_is_untied():
    config = FAMILY_CONFIGS["qwen2"]()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = _randomise(transformers.AutoModelForCausalLM.from_config(config).eval().float())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = copy.deepcopy(model)
    ids = random_ids(2, 12, seed=5)
    lowbit.quantize(model, [{"quarot": {}}], progress=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert _close(_logits(model, ids), _logits(reference, ids))


def _tiny_dir(path, tie: bool):
    save_tiny_lm(path, intermediate=96)  # 96 = 32 x 3: the online rotation's odd factor is exercised
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    _randomise(model)
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_streamed_rotation_saves_a_model_that_loads_with_its_online_rotation(tmp_path, tie):
    reference = _tiny_dir(tmp_path / "src", tie)
    out = tmp_path / "out"
    quantize_directory(tmp_path / "src", as_recipe([{"quarot": {}}]), out, save_format="fake")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["lowbit_online_rotations"] == [{"kind": "hadamard", "seed": 2, "size": 96, "suffix": "mlp.down_proj"}]
    loaded = lowbit.load(out, dtype=torch.float32, native_kernels=False).model
    ids = random_ids(2, 12, vocab=reference.config.vocab_size, seed=6)
    assert _close(_logits(loaded, ids), _logits(reference, ids))
    # without the online rotation the saved weights compute something else: the record matters
    for layer in loaded.model.layers:
        layer.mlp.down_proj._forward_pre_hooks.clear()
    assert not _close(_logits(loaded, ids), _logits(reference, ids), tol=1e-2)


def test_streamed_and_in_memory_rotations_agree(tmp_path):
    reference = _tiny_dir(tmp_path / "src", tie=False)
    recipe = [{"quarot": {}}, {"rtn": {"format": "int8", "group_size": -1}}]
    quantize_directory(tmp_path / "src", as_recipe(recipe), tmp_path / "out", save_format="fake")
    streamed = lowbit.load(tmp_path / "out", dtype=torch.float32, native_kernels=False).model
    in_memory = copy.deepcopy(reference)
    lowbit.quantize(in_memory, recipe, progress=False)
    for (name, a), b in zip(in_memory.named_parameters(), streamed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_online_rotation_runs_before_the_input_quantizer():
    """QuaRot quantizes the rotated activation: the quantizer's input must be ``x R``."""
    model = _randomise(build_family("llama").float())
    lowbit.quantize(
        model,
        [
            {"quarot": {}},
            {"rtn": {"format": "int8", "group_size": -1, "input_activations": {"format": "int4", "dynamic": True}}},
        ],
        progress=False,
    )
    down = model.model.layers[0].mlp.down_proj
    seen, rotated = [], []
    down.input_quantizer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    rotation = online_rotation_of(down)
    rotation.register_forward_hook(lambda _m, _a, out: rotated.append(out.detach()))
    with torch.no_grad():
        model(random_ids(1, 8, seed=2))
    assert seen and torch.equal(seen[0], rotated[0])


def _with_outlier_channels(model, channels=(3, 17, 40), factor=30.0):
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(channels)] *= factor
    return model


def test_rotation_makes_w4a4_closer_to_full_precision():
    """The method's point: with outlier channels in the residual stream, W4A4 after the rotation
    is closer to the full-precision model than W4A4 without it."""
    w4a4 = {
        "format": "int4",
        "group_size": -1,
        "symmetric": True,
        "input_activations": {"format": "int4", "dynamic": True},
    }
    fp = _with_outlier_channels(build_family("llama", seed=2).float())
    ids = random_ids(4, 16, seed=8)
    target = torch.log_softmax(_logits(fp, ids), -1)

    def kl(recipe):
        model = copy.deepcopy(fp)
        lowbit.quantize(model, recipe, progress=False)
        logq = torch.log_softmax(_logits(model, ids), -1)
        return float((target.exp() * (target - logq)).sum(-1).mean())

    plain, rotated = kl([{"rtn": w4a4}]), kl([{"quarot": {}}, {"rtn": w4a4}])
    assert rotated < 0.8 * plain  # 0.49-0.72 over seeds 0-3; no rotation gives 1


def test_online_rotation_is_rebuilt_identically_from_its_record():
    """A saved model stores (size, kind, seed), not the matrix: the same record gives the same
    orthogonal rotation."""
    a, b = OnlineRotation(96, "hadamard", 2), OnlineRotation(96, "hadamard", 2)
    assert torch.equal(a.rotation.matrix(), b.rotation.matrix())
    m = a.rotation.matrix()
    torch.testing.assert_close(m @ m.T, torch.eye(96, dtype=torch.float64))


def test_a_resumed_rotated_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """Interrupted after its first block, a rotated run resumes: the captured activations are the
    rotated ones saved with the progress, the finished block gets its online rotation back for the
    final check, and the outputs and the sanity report equal an uninterrupted run's."""
    from safetensors.torch import load_file

    from lowbit.api import quantize_checkpoint
    from lowbit.export.shards import ShardWriter
    from lowbit.pipeline import PipelineOptions

    _tiny_dir(tmp_path / "src", tie=False)
    recipe = [
        {"quarot": {}},
        {"rtn": {"format": "int8", "group_size": -1, "input_activations": {"format": "int4", "dynamic": True}}},
    ]
    kwargs = {
        "n_samples": 8,
        "seq_len": 64,
        "options": PipelineOptions(progress=False, sanity_samples=2),
        "force": True,
        "save_format": "lowbit",
    }
    reference = quantize_checkpoint(tmp_path / "src", recipe, tmp_path / "ref", **kwargs)
    original = ShardWriter.write

    def crash_on_second_block(self, stem, tensors):
        if stem == "block-00001":
            raise RuntimeError("disk on fire")
        return original(self, stem, tensors)

    monkeypatch.setattr(ShardWriter, "write", crash_on_second_block)
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_checkpoint(tmp_path / "src", recipe, tmp_path / "out", **kwargs)
    monkeypatch.setattr(ShardWriter, "write", original)
    resumed = quantize_checkpoint(tmp_path / "src", recipe, tmp_path / "out", **kwargs)
    assert resumed.resumed_from_block == 1
    assert resumed.sanity.kl == reference.sanity.kl > 0
    assert resumed.sanity.generated_ids == reference.sanity.generated_ids
    a = {k: v for f in sorted((tmp_path / "ref").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
