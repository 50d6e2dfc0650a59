"""Outlier Suppression+: the full-precision function is unchanged, shift and scale follow the paper's
formulas (checked against statistics gathered here with hooks), the threshold search picks the
threshold a plain transcription of its objective picks, and asymmetric outliers stop hurting W8A8."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.algorithms import StepConfigError, build_step
from lowbit.algorithms.smoothquant import weight_spec
from lowbit.formats import Quantizer
from lowbit.formats.activations import InputQuantizer, StaticObserver
from tests.conftest import FAMILY_CONFIGS, build_family, random_ids


@torch.no_grad()
def _outputs(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _with_asymmetric_outliers(model, channels=(3, 17), scale=30.0, offset=20.0):
    """Norm weights and biases that make a few residual channels large and one-signed at the
    linears' inputs (OPT-style outliers); norms without a bias get the scale only."""
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if "norm" not in name.lower() or not isinstance(weight, torch.Tensor) or weight.ndim != 1:
                continue
            if weight.shape[0] != model.config.hidden_size:
                continue
            weight[list(channels)] *= scale
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias[list(channels)] += offset
    return model


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_full_precision_function_unchanged(family):
    model = _with_asymmetric_outliers(build_family(family).float())
    vocab = model.config.vocab_size
    reference = copy.deepcopy(model)
    ids = random_ids(3, 12, vocab=vocab, seed=5)
    lowbit.quantize(model, [{"os_plus": {"grid": 5}}], calibration=random_ids(8, 12, vocab=vocab), progress=False)
    a, b = _outputs(model, ids), _outputs(reference, ids)
    assert (a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max()))
    moved = [n for (n, p), q in zip(model.named_parameters(), reference.parameters()) if not torch.equal(p, q)]
    assert moved, "nothing was shifted or scaled"


def _inputs_of(model, module, ids) -> torch.Tensor:
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def test_shift_and_scale_follow_the_formulas():
    """OPT's attention norm has a bias and q/k/v have biases: z = (max + min) / 2 per channel,
    r = max |X - z|, s = max(1, r / t) with t = threshold * max r; folded as beta' = (beta - z) / s,
    gamma' = gamma / s, W' = W s, b' = b + W z."""
    model = _with_asymmetric_outliers(build_family("opt").float())
    original = copy.deepcopy(model)
    calib = random_ids(8, 12, vocab=model.config.vocab_size)
    block = original.model.decoder.layers[0]
    x = _inputs_of(original, block.self_attn.q_proj, calib)
    z = (x.amax(0) + x.amin(0)) / 2
    r = (x - z).abs().amax(0)
    fraction = 0.25
    s = (r / (fraction * r.max())).clamp(min=1.0)
    assert (s > 1).any() and (s == 1).any()

    lowbit.quantize(model, [{"os_plus": {"threshold": fraction}}], calibration=calib, batch_size=8, progress=False)
    got = model.model.decoder.layers[0]
    norm, q = block.self_attn_layer_norm, block.self_attn.q_proj
    torch.testing.assert_close(got.self_attn_layer_norm.weight, norm.weight / s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.self_attn_layer_norm.bias, (norm.bias - z) / s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.self_attn.q_proj.weight, q.weight * s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.self_attn.q_proj.bias, q.bias + q.weight @ z, rtol=1e-5, atol=1e-5)


def test_rmsnorm_groups_are_scaled_without_a_shift():
    """Llama's RMSNorm has no bias and its q/k/v none either: only the scaling folds (centre 0)."""
    model = _with_asymmetric_outliers(build_family("llama").float())
    original = copy.deepcopy(model)
    calib = random_ids(8, 12, vocab=model.config.vocab_size)
    block = original.model.layers[0]
    x = _inputs_of(original, block.self_attn.q_proj, calib)
    r = x.abs().amax(0)
    s = (r / (0.5 * r.max())).clamp(min=1.0)
    lowbit.quantize(model, [{"os_plus": {"threshold": 0.5}}], calibration=calib, batch_size=8, progress=False)
    got = model.model.layers[0]
    torch.testing.assert_close(got.self_attn.q_proj.weight, block.self_attn.q_proj.weight * s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.input_layernorm.weight, block.input_layernorm.weight / s, rtol=1e-5, atol=1e-6)


def test_the_search_picks_the_threshold_of_smallest_w8a8_error():
    """The objective transcribed here (per-tensor static INT8 inputs, INT8 per-channel weights, every
    token kept) over the same grid: the folded scales equal those of its argmin."""
    model = _with_asymmetric_outliers(build_family("opt").float(), scale=60.0)
    original = copy.deepcopy(model)
    calib = random_ids(8, 12, vocab=model.config.vocab_size)
    block = original.model.decoder.layers[0]
    attn = block.self_attn
    x = _inputs_of(original, attn.q_proj, calib)
    z = (x.amax(0) + x.amin(0)) / 2
    xc = x - z
    r = xc.abs().amax(0)
    weights = [m.weight for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    wq = Quantizer(weight_spec({"format": "int8", "granularity": "channel"}))
    errors = {}
    grid = 8
    for i in range(1, grid + 1):
        t = float(r.max()) * i / grid
        s = (r / t).clamp(min=1.0)
        xs = xc / s
        scheme = build_step("os_plus", {}).config.search_activations
        observer = StaticObserver(scheme)
        observer.add(xs)
        xq = InputQuantizer(scheme)(xs, observer.scale())
        errors[i] = sum(float((xq @ wq.dequantize(wq.quantize(w * s)).T - xc @ w.T).pow(2).sum()) for w in weights)
    best = min(errors, key=lambda i: (errors[i], -i))
    assert len(set(errors.values())) > 1
    expected_s = (r / (float(r.max()) * best / grid)).clamp(min=1.0)

    lowbit.quantize(model, [{"os_plus": {"grid": grid}}], calibration=calib, batch_size=8, progress=False)
    got = model.model.decoder.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(got, attn.q_proj.weight * expected_s, rtol=1e-5, atol=1e-6)


def _w8a8_error(model, recipe, calib, ids) -> float:
    quantized = copy.deepcopy(model)
    lowbit.quantize(quantized, recipe, calibration=calib, progress=False)
    return float((_outputs(quantized, ids) - _outputs(model, ids)).pow(2).mean())


def test_asymmetric_outliers_hurt_per_tensor_w8a8_less_after_os_plus():
    model = _with_asymmetric_outliers(build_family("opt").float(), scale=60.0, offset=40.0)
    vocab = model.config.vocab_size
    calib, ids = random_ids(16, 16, vocab=vocab), random_ids(4, 16, vocab=vocab, seed=9)
    w8a8 = {"rtn": {"format": "int8", "group_size": -1, "input_activations": {"format": "int8", "dynamic": False}}}
    plain = _w8a8_error(model, [w8a8], calib, ids)
    shifted_scaled = _w8a8_error(model, [{"os_plus": {"grid": 10}}, w8a8], calib, ids)
    assert shifted_scaled < 0.5 * plain


def test_config_errors_name_the_field():
    with pytest.raises(StepConfigError, match="threshold"):
        build_step("os_plus", {"threshold": 0.0})
    with pytest.raises(StepConfigError, match="threshold"):
        build_step("os_plus", {"threshold": "best"})
    with pytest.raises(StepConfigError, match="search_weights"):
        build_step("os_plus", {"search_weights": "int99"})
