"""SpinQuant: Cayley SGD keeps rotations orthogonal and descends, the learned rotations leave the
full-precision function unchanged (in memory and streamed), and learning lowers its objective."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.algorithms.base import TransformContext
from lowbit.algorithms.quarot import RotationError
from lowbit.algorithms.spinquant import SpinQuantConfig, _cayley_step, learn_rotations
from lowbit.calibration import CalibrationData
from lowbit.pipeline.directory import quantize_directory
from lowbit.recipe import as_recipe
from tests.algorithms.test_quarot import _close, _logits, _randomise, _tiny_dir, _with_outlier_channels
from tests.conftest import build_family, random_ids


def _orthogonal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("seed", range(3))
def test_cayley_sgd_stays_orthogonal_and_finds_the_maximiser(seed):
    """Maximising trace(T^T R) over orthogonal R has the unique answer R = T (T orthogonal, det 1 on
    both sides): the iteration must stay on the manifold and get there."""
    n = 6
    target = _orthogonal(n, seed)
    if torch.linalg.det(target) < 0:
        target[:, 0] = -target[:, 0]
    rotation = torch.nn.Parameter(torch.eye(n, dtype=torch.float64))
    for _ in range(300):
        rotation.grad = None
        (-(target * rotation).sum()).backward()
        _cayley_step(rotation, 0.2)
        torch.testing.assert_close(rotation.data @ rotation.data.T, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(rotation.data, target, atol=1e-6, rtol=0)


def test_learned_rotations_leave_the_function_unchanged():
    model = _with_outlier_channels(_randomise(build_family("llama").float()))
    reference = copy.deepcopy(model)
    ids = random_ids(2, 12, seed=3)
    lowbit.quantize(model, [{"spinquant": {"iterations": 5}}], calibration=random_ids(8, 16, seed=9), progress=False)
    assert _close(_logits(model, ids), _logits(reference, ids))


def test_spinquant_needs_calibration_and_a_rotatable_family():
    with pytest.raises(Exception, match="calibration"):
        lowbit.quantize(build_family("llama").float(), [{"spinquant": {}}], progress=False)
    with pytest.raises(RotationError):
        lowbit.quantize(build_family("gpt2").float(), [{"spinquant": {}}], calibration=random_ids(4, 8), progress=False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_parametrised_model_is_a_rotation_of_the_original(family):
    """Without quantization the model's loss does not depend on the rotations, so the Riemannian
    gradient ``G R^T - R G^T`` of every rotation is zero (any wrong side or transpose in the
    parametrisation makes the function depend on them); with quantization it is not (the learning
    has something to follow)."""
    from torch import nn

    from lowbit.algorithms.quarot import ResidualRotation
    from lowbit.algorithms.spinquant import _parametrise, _Switch
    from lowbit.models import ModelAdapter

    model = _with_outlier_channels(_randomise(build_family(family).float()))
    for p in model.parameters():
        p.requires_grad_(False)
    config = SpinQuantConfig()
    adapter = ModelAdapter(model)
    start = ResidualRotation(adapter, config)
    start.rotate_model_outside(model)
    for index in range(len(adapter)):
        start.rotate_block(index)
    gen = torch.Generator().manual_seed(0)
    r1 = nn.Parameter(torch.linalg.qr(torch.randn(start.hidden, start.hidden, generator=gen))[0])
    r2 = [
        nn.Parameter(torch.linalg.qr(torch.randn(start.head_dim, start.head_dim, generator=gen))[0])
        for _ in adapter.blocks
    ]
    switch = _Switch()
    _parametrise(model, adapter, start, r1, r2, config, switch)
    ids = random_ids(4, 16, seed=1)

    def tangent_norms(quantize):
        switch.quantize = quantize
        for r in [r1, *r2]:
            r.grad = None
        model(input_ids=ids, labels=ids).loss.backward()
        return [float((r.grad @ r.T - r @ r.grad.T).norm()) for r in [r1, *r2]]

    assert max(tangent_norms(False)) < 1e-4
    assert min(tangent_norms(True)) > 1e-3


def test_streamed_and_in_memory_learning_agree(tmp_path):
    reference = _tiny_dir(tmp_path / "src", tie=False)
    calib = CalibrationData(input_ids=random_ids(4, 16, vocab=reference.config.vocab_size, seed=4))
    recipe = [{"spinquant": {"iterations": 5}}]
    quantize_directory(tmp_path / "src", as_recipe(recipe), tmp_path / "out", calibration=calib, save_format="fake")
    streamed = lowbit.load(tmp_path / "out", dtype=torch.float32, native_kernels=False).model
    in_memory = copy.deepcopy(reference)
    lowbit.quantize(in_memory, recipe, calibration=calib, progress=False)
    for (name, a), b in zip(in_memory.named_parameters(), streamed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    ids = random_ids(2, 12, vocab=reference.config.vocab_size, seed=6)
    assert _close(_logits(streamed, ids), _logits(reference, ids))


def test_learn_rotations_returns_orthogonal_matrices():
    model = _randomise(build_family("qwen2").float())
    calib = CalibrationData(input_ids=random_ids(4, 16, seed=2))
    residual, values = learn_rotations(
        copy.deepcopy(model), SpinQuantConfig(iterations=3), TransformContext(calibration=calib)
    )
    r = residual.matrix()
    torch.testing.assert_close(r @ r.T, torch.eye(r.shape[0], dtype=torch.float64))
    assert len(values) == model.config.num_hidden_layers
