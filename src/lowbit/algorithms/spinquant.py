"""SpinQuant (Liu et al., 2024): learn the rotations instead of drawing them.

QuaRot's rotations are random; some random rotations quantize much better than others. SpinQuant
keeps QuaRot's structure (norms fused, residual rotation ``R1``, a per-head value rotation ``R2`` in
every block, the online Hadamard before ``down_proj``) and learns ``R1`` and the ``R2``s by
minimising the quantized network's next-token cross-entropy on calibration data, with weights
and activations fake-quantized (straight-through gradients) and everything else frozen.

The rotations stay orthogonal through Cayley SGD on the Stiefel manifold: for a rotation ``R`` with
Euclidean gradient ``G``, ``A = G R^T - R G^T`` is skew-symmetric and

    R <- (I + lr/2 A)^-1 (I - lr/2 A) R

is again orthogonal (the Cayley transform of ``-lr A``), a descent step for small ``lr``. The
learning rate decays linearly to zero over ``iterations`` (the paper: 100 iterations, lr 1.5).
The learning starts from QuaRot's randomised Hadamard rotations and learns a correction on top.

Learning needs the whole model: a model held in memory is copied (in float32) for it; a streamed
checkpoint is read whole for it, then dropped again. Afterwards the learned rotations are applied
to the blocks as they load, exactly as QuaRot's (:class:`~.quarot.ResidualRotation`).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn.utils import parametrize

from ..formats import Quantizer
from ..formats.activations import ActivationScheme, InputQuantizer
from ..models import ModelAdapter, get_submodule, is_linear
from .base import EstimateInputs, StepEstimate, TransformContext, register_step
from .hadamard import Rotation
from .quarot import QuaRot, QuaRotConfig, ResidualRotation, RotationError
from .smoothquant import weight_spec

log = logging.getLogger(__name__)


class SpinQuantConfig(QuaRotConfig):
    """SpinQuant options (QuaRot's, plus the learning's).

    Attributes:
        iterations: Cayley SGD steps.
        lr: initial learning rate (decays linearly to zero).
        batch_size: calibration sequences per step (cycled through the calibration set).
        loss_weights: the weight format the loss quantizes with (a format name or mapping; default
            INT4 per output channel, symmetric: the W4A4 the paper learns for).
        loss_activations: the activation scheme the loss quantizes the linears' inputs with
            (default INT4 per token; ``null``: weights only).
        learn_values: learn the per-block value rotations too (else they stay Hadamard).
        loss: ``ce``, the paper's next-token cross-entropy of the quantized model on the calibration
            text; or ``kl``, its KL divergence from the full-precision model's next-token
            distribution (one more forward pass per step, without quantization).
    """

    iterations: int = Field(100, ge=1)
    lr: float = Field(1.5, gt=0)
    batch_size: int = Field(4, ge=1)
    loss_weights: str | dict = Field(default_factory=lambda: {"format": "int4", "group_size": -1, "symmetric": True})
    loss_activations: ActivationScheme | None = Field(
        default_factory=lambda: ActivationScheme(format="int4", dynamic=True)
    )
    learn_values: bool = True
    loss: Literal["ce", "kl"] = "ce"

    @field_validator("loss_weights")
    @classmethod
    def _weights(cls, v: str | dict) -> str | dict:
        weight_spec(v)
        return v


@register_step
class SpinQuant(QuaRot):
    """Rotations learned by Cayley SGD on the quantized model's loss (needs calibration data)."""

    name = "spinquant"
    Config = SpinQuantConfig
    needs_calibration = True

    def model_transform(self, adapter: ModelAdapter, context: TransformContext) -> ResidualRotation:
        cfg: SpinQuantConfig = self.config
        if context.calibration is None:
            raise RotationError("spinquant learns its rotations on calibration data; pass calibration=...")
        # built first: it refuses families a rotation would break before any work, and notes a tied head
        # before the learning unties the (streamed) skeleton's
        transform = ResidualRotation(adapter, cfg)
        streamed = any(p.device.type == "meta" for p in adapter.model.parameters())
        if streamed:
            dtype = next(p.dtype for p in adapter.model.parameters() if p.is_floating_point())
            context.load_model()
            work = adapter.model
        else:
            work = copy.deepcopy(adapter.model)
        try:
            transform.residual, transform.value_rotations = learn_rotations(work, cfg, context)
        finally:
            if streamed:
                context.release_model()
                adapter.model.to(dtype)  # the skeleton computes in its own dtype again
            del work
        return transform

    def estimate(self, inputs: EstimateInputs) -> StepEstimate:
        """A float32 copy of the model, and per iteration a forward and backward pass over one batch."""
        cfg: SpinQuantConfig = self.config
        params = inputs.block_params * inputs.blocks
        return StepEstimate(memory_bytes=4 * params * 2, flops=6.0 * params * cfg.iterations * cfg.batch_size * 512)


class _RightRotation(nn.Module):
    """``W -> W R`` (the input side of a linear, or rows of an embedding)."""

    def __init__(self, rotation: nn.Parameter):
        super().__init__()
        self.rotation = rotation

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight @ self.rotation


class _LeftRotation(nn.Module):
    """``W -> R^T W`` (the output side of a linear); a bias (1-D) ``b -> b R``."""

    def __init__(self, rotation: nn.Parameter):
        super().__init__()
        self.rotation = rotation

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return weight @ self.rotation
        return self.rotation.T @ weight


class _HeadRotation(nn.Module):
    """Per head of size ``d``: output rows ``W_h -> R^T W_h`` (values) or input columns ``W_h -> W_h R`` (o_proj)."""

    def __init__(self, rotation: nn.Parameter, side: str):
        super().__init__()
        self.rotation = rotation
        self.side = side

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        d = self.rotation.shape[0]
        if self.side == "rows":
            if weight.ndim == 1:
                return (weight.view(-1, d) @ self.rotation).reshape(-1)
            return (self.rotation.T @ weight.view(-1, d, weight.shape[1])).reshape(weight.shape)
        return (weight.view(weight.shape[0], -1, d) @ self.rotation).reshape(weight.shape)


class _Switch:
    """Turns the learning model's fake quantization off for the full-precision targets of the KL loss."""

    quantize = True


class _FakeQuant(nn.Module):
    def __init__(self, quantizer: Quantizer, switch: _Switch):
        super().__init__()
        self.quantizer = quantizer
        self.switch = switch

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantizer.fake_quant(weight) if self.switch.quantize else weight


def learn_rotations(
    model: nn.Module, config: SpinQuantConfig, context: TransformContext, losses: list[float] | None = None
) -> tuple[Rotation, list[Rotation] | None]:
    """Learn ``R1`` and the per-block ``R2`` on ``model`` (a copy: it is rotated and parametrised in
    place); returns them as rotations of the original model (QuaRot's start times the learned part).
    ``losses`` receives the loss of every step (before its update)."""
    model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = ModelAdapter(model)
    start = ResidualRotation(adapter, config)
    start.rotate_model_outside(model)
    for index in range(len(adapter)):
        start.rotate_block(index)
    n, d = start.hidden, start.head_dim
    r1 = nn.Parameter(torch.eye(n))
    r2 = [nn.Parameter(torch.eye(d)) for _ in range(len(adapter))] if config.learn_values and config.values else []
    switch = _Switch()
    parametrised, hooks = _parametrise(model, adapter, start, r1, r2, config, switch)
    try:
        _cayley_sgd(model, [r1, *r2], config, context, switch, losses if losses is not None else [])
    finally:
        for module, name in parametrised:
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        residual = Rotation.from_matrix(start.residual.matrix() @ r1.detach().double())
        values = None
        if r2:
            h = start.value_rotation.matrix()
            values = [Rotation.from_matrix(h @ r.detach().double()) for r in r2]
    return residual, values


def _parametrise(
    model, adapter, start: ResidualRotation, r1, r2, config: SpinQuantConfig, switch: _Switch
) -> tuple[list, list]:
    """Weights as functions of the rotations (then fake-quantized), and the linears' inputs
    fake-quantized; returns what to undo."""
    spec = adapter.arch.residual
    quantizer = Quantizer(weight_spec(config.loss_weights))
    parametrised, hooks = [], []

    def add(module, name, parametrization):
        parametrize.register_parametrization(module, name, parametrization, unsafe=True)
        parametrised.append((module, name))

    add(model.get_input_embeddings(), "weight", _RightRotation(r1))
    head = model.get_submodule(start.head_name.removesuffix(".weight")) if start.head_name else None
    if head is not None:
        add(head, "weight", _RightRotation(r1))
    for index, block in enumerate(adapter.blocks):
        writers = {id(get_submodule(block, name)) for name in spec.writers}
        v_name, o_name = spec.values if spec.values is not None else (None, None)
        for name, linear in ModelAdapter.linears_in(block).items():
            if id(linear) in writers:
                add(linear, "weight", _LeftRotation(r1))
                if linear.bias is not None:
                    add(linear, "bias", _LeftRotation(r1))
            elif is_linear(linear):
                add(linear, "weight", _RightRotation(r1))
            if r2 and name == v_name:
                add(linear, "weight", _HeadRotation(r2[index], "rows"))
                if linear.bias is not None:
                    add(linear, "bias", _HeadRotation(r2[index], "rows"))
            if r2 and name == o_name:
                add(linear, "weight", _HeadRotation(r2[index], "columns"))
            add(linear, "weight", _FakeQuant(quantizer, switch))
            if config.loss_activations is not None:
                quantize_input = InputQuantizer(config.loss_activations)

                def hook(_m, args, q=quantize_input):
                    return (q(args[0]), *args[1:]) if switch.quantize else args

                hooks.append(linear.register_forward_pre_hook(hook))
    return parametrised, hooks


def _cayley_sgd(
    model: nn.Module,
    rotations: list[nn.Parameter],
    config: SpinQuantConfig,
    context,
    switch: _Switch,
    losses: list[float],
) -> None:
    calibration = context.calibration
    device = torch.device(context.device)
    model.to(device)
    ids = calibration.input_ids
    mask = calibration.attention_mask
    started = time.perf_counter()
    for step in range(config.iterations):
        rows = torch.arange(step * config.batch_size, (step + 1) * config.batch_size) % ids.shape[0]
        batch = {"input_ids": ids[rows].to(device)}
        if mask is not None:
            batch["attention_mask"] = mask[rows].to(device)
        if config.loss == "kl":
            switch.quantize = False
            with torch.no_grad():
                target = torch.log_softmax(model(**batch, use_cache=False).logits.float(), -1)
            switch.quantize = True
            logq = torch.log_softmax(model(**batch, use_cache=False).logits.float(), -1)
            kl = (target.exp() * (target - logq)).sum(-1)
            keep = batch["attention_mask"].bool() if mask is not None else torch.ones_like(kl, dtype=torch.bool)
            loss = kl[keep].mean()
        else:
            labels = batch["input_ids"]
            if mask is not None:
                labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels, use_cache=False).loss
        for r in rotations:
            r.grad = None
        loss.backward()
        losses.append(float(loss))
        lr = config.lr * (1 - step / config.iterations)
        with torch.no_grad():
            for r in rotations:
                _cayley_step(r, lr)
        if step % 10 == 0 or step == config.iterations - 1:
            seconds = time.perf_counter() - started
            log.info(
                "spinquant step %d/%d: %s %.4f (%.0fs)", step + 1, config.iterations, config.loss, losses[-1], seconds
            )
    model.to("cpu")


def _cayley_step(rotation: nn.Parameter, lr: float) -> None:
    """``R <- (I + lr/2 A)^-1 (I - lr/2 A) R`` with ``A = G R^T - R G^T`` (orthogonal stays orthogonal)."""
    if rotation.grad is None:
        return
    r = rotation.data.double()
    g = rotation.grad.double()
    a = g @ r.T - r @ g.T
    eye = torch.eye(r.shape[0], dtype=torch.float64, device=r.device)
    updated = torch.linalg.solve(eye + (lr / 2) * a, (eye - (lr / 2) * a) @ r)
    rotation.data.copy_(updated.to(rotation.dtype))
