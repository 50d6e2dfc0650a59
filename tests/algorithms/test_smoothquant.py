"""SmoothQuant: the full-precision function is unchanged, the factors follow the paper's formula, and
outlier channels stop hurting W8A8."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.algorithms import StepConfigError, build_step
from tests.conftest import FAMILY_CONFIGS, build_family, random_ids


@torch.no_grad()
def _outputs(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _with_outlier_channels(model, channels=(3, 17), factor=40.0):
    """Norm weights that make a few residual channels large at every linear's input (as in LLMs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name.lower() and "weight" in name and p.shape[0] == model.config.hidden_size:
                p[list(channels)] *= factor
    return model


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_full_precision_function_unchanged(family):
    model = _with_outlier_channels(build_family(family).float())
    vocab = model.config.vocab_size
    reference = copy.deepcopy(model)
    ids = random_ids(3, 12, vocab=vocab, seed=5)
    lowbit.quantize(
        model, [{"smoothquant": {"alpha": 0.5}}], calibration=random_ids(8, 12, vocab=vocab), progress=False
    )
    a, b = _outputs(model, ids), _outputs(reference, ids)
    assert (a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max()))
    moved = [n for (n, p), q in zip(model.named_parameters(), reference.parameters()) if not torch.equal(p, q)]
    assert moved, "nothing was smoothed"


def test_factors_follow_the_formula():
    model = _with_outlier_channels(build_family("llama").float())
    original = copy.deepcopy(model)
    calib = random_ids(8, 12, vocab=model.config.vocab_size)
    block = original.model.layers[0]
    seen = []
    handle = block.self_attn.q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        original(calib)
    handle.remove()
    x_max = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).abs().amax(0)
    attn = block.self_attn
    w_max = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).abs().amax(0)
    alpha = 0.7
    s = x_max.pow(alpha) / w_max.pow(1 - alpha)

    lowbit.quantize(model, [{"smoothquant": {"alpha": alpha}}], calibration=calib, batch_size=8, progress=False)
    got = model.model.layers[0]
    torch.testing.assert_close(got.self_attn.q_proj.weight, attn.q_proj.weight * s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.input_layernorm.weight, block.input_layernorm.weight / s, rtol=1e-5, atol=1e-7)


def _w8a8_error(model, reference, recipe, calib, ids) -> float:
    model = copy.deepcopy(model)
    lowbit.quantize(model, recipe, calibration=calib, progress=False)
    return float((_outputs(model, ids) - _outputs(reference, ids)).pow(2).mean())


def test_outlier_channels_hurt_per_tensor_w8a8_less_after_smoothing():
    model = _with_outlier_channels(build_family("llama").float(), factor=100.0)
    vocab = model.config.vocab_size
    calib, ids = random_ids(16, 16, vocab=vocab), random_ids(4, 16, vocab=vocab, seed=9)
    w8a8 = {"rtn": {"format": "int8", "group_size": -1, "input_activations": {"format": "int8", "dynamic": False}}}
    plain = _w8a8_error(model, model, [w8a8], calib, ids)
    smoothed = _w8a8_error(model, model, [{"smoothquant": {"alpha": 0.5}}, w8a8], calib, ids)
    searched = _w8a8_error(model, model, [{"smoothquant": {"alpha": "search", "grid": 10}}, w8a8], calib, ids)
    assert smoothed < 0.5 * plain
    assert searched < 0.5 * plain


def test_config_errors_name_the_field():
    with pytest.raises(StepConfigError, match="alpha"):
        build_step("smoothquant", {"alpha": 1.5})
    with pytest.raises(StepConfigError, match="alpha"):
        build_step("smoothquant", {"alpha": "best"})
    with pytest.raises(StepConfigError, match="search_weights"):
        build_step("smoothquant", {"search_weights": "int99"})
