"""Mixture-of-Experts blocks: fused expert tensors seen as one Linear per expert projection.

transformers 5 stores the experts of Mixtral and Qwen-MoE as two 3-D parameters
(``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``) while checkpoints on disk keep one
weight per expert projection. lowbit replaces the fused module by :class:`UnfusedExperts`, whose
Linears are *views* of the fused tensors (no copy; quantizing them writes into the fused
tensors), so every algorithm handles experts like any other linear, and streaming reads and
writes the per-expert tensors of the checkpoint directly.

The router stays a non-Linear module and is therefore kept in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MoESpec:
    """Where the experts are, in the loaded model and in checkpoints on disk.

    Attributes:
        path: block-relative path of the fused experts module (``mlp.experts``).
        model_prefix / checkpoint_prefix: the MoE block's path in the model and on disk
            (Mixtral: ``mlp`` / ``block_sparse_moe``).
        gate, up, down: the per-expert projection names on disk.
    """

    path: str = "mlp.experts"
    model_prefix: str = "mlp"
    checkpoint_prefix: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


class UnfusedExperts(nn.ModuleList):
    """One module per expert with ``gate``/``up``/``down`` Linears; same call as the fused module."""

    def __init__(self, fused: nn.Module, spec: MoESpec):
        gate_up, down = fused.gate_up_proj, fused.down_proj
        n_experts, two_i, _ = gate_up.shape
        inter = two_i // 2
        experts = []
        for e in range(n_experts):
            expert = nn.Module()
            for name, weight in ((spec.gate, gate_up[e, :inter]), (spec.up, gate_up[e, inter:]), (spec.down, down[e])):
                lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
                lin.weight = nn.Parameter(weight.detach(), requires_grad=False)  # a view of the fused tensor
                setattr(expert, name, lin)
            experts.append(expert)
        super().__init__(experts)
        self.spec = spec
        self.fused = [fused]  # in a list: not a registered submodule, so its tensors are not seen twice
        self.act = [fused.act_fn]  # in a list, so that it is not one more entry of this ModuleList
        self.route_all = False
        self.counting = False
        self.tokens_seen = torch.zeros(n_experts, dtype=torch.long)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        m = self[e]
        s = self.spec
        return getattr(m, s.down)(self.act[0](getattr(m, s.gate)(x)) * getattr(m, s.up)(x))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(len(self)):
            token_idx, slot = torch.where(top_k_index == e)
            if self.counting:
                self.tokens_seen[e] += len(token_idx)
            if self.route_all:  # every token through every expert, so that each gets statistics
                y = self._expert(e, hidden_states)[token_idx]
            elif len(token_idx) == 0:
                continue
            else:
                y = self._expert(e, hidden_states[token_idx])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out

    def refuse(self) -> nn.Module:
        """The fused module, holding the current expert weights."""
        fused = self.fused[0]
        inter = fused.gate_up_proj.shape[1] // 2
        s = self.spec
        with torch.no_grad():
            for e, expert in enumerate(self):
                for name, target in (
                    (s.gate, fused.gate_up_proj[e, :inter]),
                    (s.up, fused.gate_up_proj[e, inter:]),
                    (s.down, fused.down_proj[e]),
                ):
                    w = getattr(expert, name).weight
                    if w.data_ptr() != target.data_ptr() and w.device.type != "meta":
                        target.copy_(w)
        return fused


def _is_fused(module: nn.Module | None) -> bool:
    return (
        module is not None
        and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
        and not isinstance(module, UnfusedExperts)
    )


def unfuse_experts(block: nn.Module, spec: MoESpec) -> UnfusedExperts | None:
    parent_path, _, attr = spec.path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    fused = getattr(parent, attr, None)
    if isinstance(fused, UnfusedExperts):
        return fused
    if not _is_fused(fused):
        return None
    unfused = UnfusedExperts(fused, spec)
    setattr(parent, attr, unfused)
    return unfused


def refuse_experts(block: nn.Module, spec: MoESpec) -> None:
    parent_path, _, attr = spec.path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    unfused = getattr(parent, attr, None)
    if isinstance(unfused, UnfusedExperts):
        setattr(parent, attr, unfused.refuse())


def experts_of(block: nn.Module, spec: MoESpec | None) -> UnfusedExperts | None:
    if spec is None:
        return None
    try:
        module = block.get_submodule(spec.path)
    except AttributeError:
        return None
    return module if isinstance(module, UnfusedExperts) else None
