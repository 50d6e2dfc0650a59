"""QuaRot (Ashkboos et al., 2024): rotate the model so that weights and activations lose their outliers.

A rotation ``Q`` of the residual stream leaves a pre-norm transformer's function unchanged once
the RMSNorms' per-channel weights are fused into the linears that read them:

- every norm's weight ``g`` moves into its readers (``W <- W diag(g)``) and the norm keeps
  ``x / rms(x)``, which a rotation does not change (``rms(x Q) = rms(x)``);
- readers of the stream take ``W <- W Q`` (input side); writers to it (``o_proj``, ``down_proj``)
  take ``W <- Q^T W`` (output side, and ``b <- b Q``); the embeddings ``E <- E Q``; the head,
  after the final norm's weight, ``W <- W diag(g) Q``. A tied head is untied first.

Then ``x Q`` flows through the blocks instead of ``x``: its outlier channels are spread over all
channels, so the inputs of q/k/v/gate/up quantize far better (W4A4). Two more rotations, as in the
paper:

- **values**: a Hadamard ``H`` per head between ``v_proj``'s outputs and ``o_proj``'s inputs
  (attention mixes tokens, not channels, so ``v H`` reaches ``o`` as ``o H``): offline;
- **online**: ``down_proj``'s input (the MLP's intermediate activation, which has the worst
  outliers) is rotated at run time by an :class:`~.hadamard.OnlineRotation` (``O(n log n)``
  Walsh-Hadamard), and its weight takes ``W <- W R``. The saved model keeps it: the config lists it
  (``lowbit_online_rotations``) and ``lowbit.load`` attaches it again.

Residual and value rotations are randomised Hadamard matrices (times a small random orthogonal
factor where the width is not a power of two), or dense random orthogonal ones
(``rotation: orthogonal``). The step quantizes nothing: a later step (RTN, GPTQ) quantizes the
rotated weights, with ``input_activations`` for W4A4.

In the pipeline the rotation is a model transform (:class:`ResidualRotation`): every block is
rotated as it loads, the captured first-block inputs are rotated once, and the embeddings and head
as they are read or written; a streamed model is never held whole.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn

from ..models import ModelAdapter, get_submodule, is_linear
from .base import ModelTransform, Step, StepConfig, TransformContext, register_step
from .hadamard import OnlineRotation, Rotation, attach_online_rotation, rotate_columns_, rotate_rows_

log = logging.getLogger(__name__)


class QuaRotConfig(StepConfig):
    """QuaRot options (the rotation is the whole model's: ``targets``/``ignore`` do not apply).

    Attributes:
        rotation: the residual stream's rotation: ``hadamard`` (randomised Hadamard) or
            ``orthogonal`` (a dense random orthogonal matrix).
        seed: the random signs and factors of every rotation.
        values: rotate each attention head's values by a Hadamard, undone in ``o_proj`` (offline).
        online: rotate ``down_proj``'s input at run time (an online Hadamard the saved model keeps).
    """

    rotation: Literal["hadamard", "orthogonal"] = "hadamard"
    seed: int = 0
    values: bool = True
    online: bool = True


@register_step
class QuaRot(Step):
    """Rotation of the residual stream (and of values and ``down_proj``'s input) before quantization."""

    name = "quarot"
    Config = QuaRotConfig

    def model_transform(self, adapter: ModelAdapter, context: TransformContext) -> ResidualRotation:
        return ResidualRotation(adapter, self.config)

    def apply(self, unit) -> None:
        """Nothing per unit: the pipeline rotated the block when it loaded it."""


class RotationError(ValueError):
    """The model cannot be rotated (its family, or its norms, do not allow it)."""


class ResidualRotation(ModelTransform):
    """The rotations of one model: applied to blocks, captured activations and the outside weights."""

    def __init__(
        self,
        adapter: ModelAdapter,
        config: QuaRotConfig,
        residual: Rotation | None = None,
        value_rotations: list[Rotation] | None = None,
    ):
        """``residual`` and ``value_rotations`` (one per block) replace the seeded Hadamard rotations
        (SpinQuant's learned ones)."""
        arch = adapter.arch
        if arch.residual is None:
            raise RotationError(
                f"{arch.name} models cannot be rotated: their residual stream does not pass a rotation unchanged "
                "(post-norm, or norms on the blocks' outputs)"
            )
        self.adapter = adapter
        self.spec = arch.residual
        self.config = config
        model_config = adapter.model.config
        self.hidden = int(model_config.hidden_size)
        self.offset = arch.norm_offset
        self.residual = residual or Rotation(self.hidden, config.rotation, config.seed)
        heads = int(model_config.num_attention_heads)
        self.head_dim = int(getattr(model_config, "head_dim", None) or self.hidden // heads)
        self.value_rotation = Rotation(self.head_dim, "hadamard", config.seed + 1) if config.values else None
        self.value_rotations = value_rotations
        self.online: OnlineRotation | None = None
        embedding = adapter.model.get_input_embeddings()
        names = {id(m): n for n, m in adapter.model.named_modules()}
        self.embedding_name = f"{names[id(embedding)]}.weight"
        norm_name, norm = adapter.final_norm()
        head_name, head = adapter.lm_head()
        if norm is None:
            raise RotationError(f"{arch.name}: no final norm found; the head cannot take the rotation")
        _check_rms_norm(norm_name, norm)
        self.norm_name = f"{norm_name}.weight"
        self.head_name = f"{head_name}.weight" if head is not None else None
        self.tied = bool(getattr(model_config, "tie_word_embeddings", False)) and head is not None

    # ------------------------------------------------------------------ activations and blocks
    def rotate_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.residual.apply(hidden)

    @torch.no_grad()
    def rotate_block(self, index: int) -> None:
        block = self.adapter.blocks[index]
        prefix = self.adapter.block_name(index)
        readers: dict[int, tuple[str, nn.Module, list[nn.Module]]] = {}
        for group in self.adapter.groups(index):
            if group.prev is None or is_linear(group.prev):
                continue
            entry = readers.setdefault(id(group.prev), (group.prev_name, group.prev, []))
            entry[2].extend(group.linears.values())
        if len(readers) < 2:
            raise RotationError(f"{prefix}: expected the norms before attention and MLP, found {len(readers)}")
        for norm_name, norm, linears in readers.values():
            _check_rms_norm(f"{prefix}.{norm_name}", norm)
            gain = self.offset + norm.weight.detach().float()
            for linear in linears:
                weight = _linear_weight(linear, f"{prefix}.{norm_name}'s reader")
                weight.copy_((weight.float() * gain).to(weight.dtype))
                rotate_rows_(weight, self.residual)
            norm.weight.fill_(1.0 - self.offset)
        for name in self.spec.writers:
            writer = get_submodule(block, name)
            if writer is None:
                raise RotationError(f"{prefix}: no {name}")
            rotate_columns_(_linear_weight(writer, f"{prefix}.{name}"), self.residual)
            if writer.bias is not None:
                writer.bias.copy_(self.residual.apply(writer.bias.float()).to(writer.bias.dtype))
        if self.value_rotation is not None and self.spec.values is not None:
            rotation = self.value_rotations[index] if self.value_rotations is not None else self.value_rotation
            self._rotate_values(block, prefix, rotation)
        if self.config.online and self.spec.mlp_out is not None:
            down = get_submodule(block, self.spec.mlp_out)
            weight = _linear_weight(down, f"{prefix}.{self.spec.mlp_out}")
            if self.online is None or self.online.rotation.n != weight.shape[1]:
                self.online = OnlineRotation(weight.shape[1], "hadamard", self.config.seed + 2)
            rotate_rows_(weight, self.online.rotation)
            attach_online_rotation(down, self.online)

    def _rotate_values(self, block: nn.Module, prefix: str, rotation: Rotation) -> None:
        v_name, o_name = self.spec.values
        v, o = get_submodule(block, v_name), get_submodule(block, o_name)
        d = self.head_dim
        v_weight = _linear_weight(v, f"{prefix}.{v_name}")
        o_weight = _linear_weight(o, f"{prefix}.{o_name}")
        if v_weight.shape[0] % d or o_weight.shape[1] % d:
            raise RotationError(f"{prefix}: {v_name}/{o_name} widths are not multiples of the head size {d}")
        for head in range(v_weight.shape[0] // d):  # v_h <- v_h H: each head's rows take H^T
            rotate_columns_(v_weight[head * d : (head + 1) * d], rotation)
        if v.bias is not None:
            v.bias.copy_(rotation.apply(v.bias.float().view(-1, d)).reshape(-1).to(v.bias.dtype))
        rotate_rows_(o_weight.view(-1, d), rotation)  # each head's columns of o take H

    def attach_online(self, index: int) -> None:
        """Attach the online rotation to a block rotated earlier (a resumed run's finished blocks)."""
        if self.config.online and self.spec.mlp_out is not None:
            down = get_submodule(self.adapter.blocks[index], self.spec.mlp_out)
            size = down.in_features
            if self.online is None or self.online.rotation.n != size:
                self.online = OnlineRotation(size, "hadamard", self.config.seed + 2)
            attach_online_rotation(down, self.online)

    # ------------------------------------------------------------------ outside the blocks
    def outside_roles(self) -> dict[str, str]:
        roles = {self.embedding_name: "embedding", self.norm_name: "norm"}
        if self.head_name is not None:
            roles[self.head_name] = "head"
        return roles

    @torch.no_grad()
    def rotate_outside(self, role: str, tensor: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
        """The rotated version of an outside tensor (``norm_weight``: the final norm's original weight).
        Works in place on ``tensor`` when it is writable."""
        if role == "norm":
            return torch.full_like(tensor, 1.0 - self.offset)
        if role == "head":
            gain = self.offset + norm_weight.float()
            rows = max(1, 16 * 2**20 // (4 * tensor.shape[1]))
            for start in range(0, tensor.shape[0], rows):
                part = tensor[start : start + rows]
                part.copy_(self.residual.apply(part.float() * gain).to(tensor.dtype))
            return tensor
        rotate_rows_(tensor, self.residual)
        return tensor

    def untie(self, model: nn.Module) -> None:
        """Give a tied head its own weight (a copy of the embeddings, or an empty one on a skeleton)."""
        if not self.tied:
            return
        head = model.get_submodule(self.head_name.removesuffix(".weight"))
        embedding = model.get_input_embeddings()
        if head.weight is embedding.weight:
            head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        text_config = getattr(model.config, "get_text_config", None)
        if text_config is not None:
            text_config().tie_word_embeddings = False

    @torch.no_grad()
    def rotate_model_outside(self, model: nn.Module) -> None:
        """Rotate the embeddings, final norm and head of a model held in memory."""
        self.untie(model)
        norm = model.get_parameter(self.norm_name)
        original = norm.detach().clone()
        for name, role in self.outside_roles().items():
            param = model.get_parameter(name)
            param.data = self.rotate_outside(role, param.data, original)

    def config_updates(self) -> dict[str, Any]:
        updates: dict[str, Any] = {}
        if self.tied:
            updates["tie_word_embeddings"] = False
        if self.online is not None:
            updates["lowbit_online_rotations"] = [{"suffix": self.spec.mlp_out, **self.online.describe()}]
        return updates


def _check_rms_norm(name: str, norm: nn.Module) -> None:
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    if "RMSNorm" not in type(norm).__name__ or not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        raise RotationError(f"{name} is a {type(norm).__name__}, not an RMSNorm: a rotation would change its output")
    if isinstance(bias, torch.Tensor):
        raise RotationError(f"{name} has a bias: a rotation would change its output")


def _linear_weight(module: nn.Module | None, what: str) -> torch.Tensor:
    if not isinstance(module, nn.Linear):
        raise RotationError(f"{what} is {type(module).__name__}, not an nn.Linear")
    return module.weight.data
