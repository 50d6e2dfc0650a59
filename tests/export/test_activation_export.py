"""Activation quantization survives saving: compressed-tensors' ``input_activations`` and
``input_scale``, read back by transformers (with compressed-tensors) and by lowbit.load."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.api import quantize_checkpoint
from lowbit.export.layouts import ExportError
from lowbit.pipeline import PipelineOptions
from tests.conftest import random_ids, save_tiny_lm

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

OPTIONS = PipelineOptions(sanity_generate=0, progress=False)


def _recipe(dynamic: bool, smooth: bool = False) -> list:
    steps = [{"smoothquant": {"alpha": 0.5}}] if smooth else []
    acts = {"format": "int8", "dynamic": dynamic}
    return [*steps, {"rtn": {"format": "int8", "group_size": -1, "input_activations": acts}}]


@pytest.mark.parametrize(("dynamic", "smooth"), [(True, False), (False, True)])
def test_streaming_export_runs_the_same_in_transformers(tmp_path, dynamic, smooth):
    save_tiny_lm(tmp_path / "src", layers=2)
    out = tmp_path / "out"
    run = quantize_checkpoint(tmp_path / "src", _recipe(dynamic, smooth), out, n_samples=8, seq_len=32, options=OPTIONS)
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"]["strategy"] == ("token" if dynamic else "tensor")
    assert all(r.activations and r.activation_bits == 8 for r in run.report.layers)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(run.report.table())
    assert ("a8-int8-dynamic" if dynamic else "a8-int8-static-minmax") in console.export_text()

    ids = random_ids(2, 20, vocab=100, seed=3)
    ours = lowbit.load(out, dtype=torch.float32, native_kernels=False).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
        # the same weights without input quantization: the activations must make a difference
        for m in ours.modules():
            m._forward_pre_hooks.clear()
        weight_only = ours(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert float((a - weight_only).abs().max()) > 1e-3
    if not dynamic:
        q_proj = theirs.model.layers[0].self_attn.q_proj
        assert q_proj.input_scale.numel() == 1


def test_in_memory_save_round_trip(tmp_path):
    save_tiny_lm(tmp_path / "src", layers=1)
    model = lowbit.load(tmp_path / "src", dtype=torch.float32).model
    calib = random_ids(8, 16, vocab=100)
    res = lowbit.quantize(model, _recipe(False), calibration=calib, progress=False)
    ids = random_ids(2, 12, vocab=100, seed=4)
    with torch.no_grad():
        expected = res.model(ids).logits
    res.save(tmp_path / "ct", save_format="compressed-tensors")
    with torch.no_grad():
        got = lowbit.load(tmp_path / "ct", dtype=torch.float32, native_kernels=False).model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(ExportError, match="cannot record activation quantization"):
        res.save(tmp_path / "fake", save_format="fake")
    assert not (tmp_path / "fake").exists()


def test_layouts_without_activations_are_refused_before_any_work(tmp_path):
    save_tiny_lm(tmp_path / "src", layers=1)
    for fmt in ("fake", "gguf"):
        with pytest.raises(ExportError, match="cannot record activation quantization"):
            quantize_checkpoint(tmp_path / "src", _recipe(True), tmp_path / fmt, save_format=fmt, options=OPTIONS)
        assert not (tmp_path / fmt).exists()


def test_block_scaled_activations_go_to_lowbits_layout(tmp_path):
    """MXFP4/NVFP4 inputs: compressed-tensors' loaders choose their block scales by other rules, so
    ``auto`` saves lowbit's layout (which lowbit.load reads back exactly) and an explicit
    compressed-tensors request is refused before any work."""
    save_tiny_lm(tmp_path / "src", layers=1)
    recipe = [{"rtn": {"format": "mxfp4", "input_activations": {"format": "mxfp4"}}}]
    with pytest.raises(ExportError, match="mxfp4 activations"):
        quantize_checkpoint(
            tmp_path / "src", recipe, tmp_path / "ct", save_format="compressed-tensors", options=OPTIONS
        )
    assert not (tmp_path / "ct").exists()
    model = lowbit.load(tmp_path / "src", dtype=torch.float32).model
    res = lowbit.quantize(model, recipe, progress=False)
    ids = random_ids(2, 12, vocab=100, seed=4)
    with torch.no_grad():
        expected = res.model(ids).logits
    res.save(tmp_path / "auto")
    config = json.loads((tmp_path / "auto" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lowbit" and config["input_activations"]
    with torch.no_grad():
        got = lowbit.load(tmp_path / "auto", dtype=torch.float32, native_kernels=False).model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
