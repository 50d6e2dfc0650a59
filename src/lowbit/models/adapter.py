"""A loaded model seen through its :class:`Architecture`: blocks, linears, groups, head."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .architectures import Architecture, LinearGroup, UnsupportedArchitectureError, architecture_for
from .linear import in_features, is_linear, out_features
from .moe import experts_of, refuse_experts, unfuse_experts


@dataclass(frozen=True)
class ResolvedGroup:
    """A :class:`LinearGroup` inside one concrete block (absent layers dropped)."""

    linears: dict[str, nn.Module]  # block-relative name -> module
    prev_name: str | None
    prev: nn.Module | None
    inspect_name: str | None
    inspect: nn.Module | None
    stage: str | None = None
    shift_passes: bool = False


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


class ModelAdapter:
    """Finds the parts of a Hugging Face model that lowbit works on."""

    def __init__(self, model: nn.Module, arch: Architecture | None = None):
        self.model = model
        config = getattr(model, "config", None)
        self.arch = arch or architecture_for(config, type(model).__name__)
        for path in self.arch.block_paths:
            blocks = get_submodule(model, path)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                self.blocks_path = path
                self.blocks: nn.ModuleList = blocks
                break
        else:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__}: none of the block paths {self.arch.block_paths} of architecture "
                f"{self.arch.name!r} holds a ModuleList of blocks"
            )

    # ------------------------------------------------------------------ names
    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def block_names(self) -> list[str]:
        return [self.block_name(i) for i in range(len(self.blocks))]

    def __len__(self) -> int:
        return len(self.blocks)

    # ------------------------------------------------------------------ linears
    @staticmethod
    def linears_in(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
        """All Linear/Conv1D layers under ``module``, by (prefixed) name, in definition order."""
        out = {}
        for name, sub in module.named_modules():
            if is_linear(sub):
                out[f"{prefix}.{name}" if prefix and name else (prefix or name)] = sub
        return out

    def block_linears(self, index: int) -> dict[str, nn.Module]:
        """Full names -> linear layers of block ``index``."""
        return self.linears_in(self.blocks[index], self.block_name(index))

    def outside_linears(self) -> dict[str, nn.Module]:
        """Linears that are not inside a block (lm_head, pooler ...)."""
        inside = self.blocks_path + "."
        return {n: m for n, m in self.linears_in(self.model).items() if not n.startswith(inside)}

    def outside_modules(self) -> dict[str, nn.Module]:
        """Modules outside the blocks that hold weights of their own (embeddings, final norm, head)."""
        inside = self.blocks_path + "."
        return {
            name: module
            for name, module in self.model.named_modules()
            if name != self.blocks_path and not name.startswith(inside) and list(module.parameters(recurse=False))
        }

    # ------------------------------------------------------------------ groups
    def groups(self, index: int) -> list[ResolvedGroup]:
        """The architecture's linear groups in block ``index``, checked against the real modules."""
        block = self.blocks[index]
        out = []
        for group in (*self.arch.groups, *self._expert_groups(block)):
            resolved = self._resolve(block, group)
            if resolved is not None:
                out.append(resolved)
        return out

    def _expert_groups(self, block: nn.Module) -> list[LinearGroup]:
        spec = self.arch.moe
        experts = experts_of(block, spec)
        if experts is None:
            return []
        base = spec.path
        first = [
            LinearGroup((f"{base}.{e}.{spec.gate}", f"{base}.{e}.{spec.up}"), stage="experts_in")
            for e in range(len(experts))
        ]
        second = [
            LinearGroup((f"{base}.{e}.{spec.down}",), prev=f"{base}.{e}.{spec.up}", stage="experts_out")
            for e in range(len(experts))
        ]
        return first + second

    # ------------------------------------------------------------------ mixture of experts
    def unfuse_experts(self) -> int:
        """Replace fused expert modules by per-expert Linears (views); returns how many blocks had them."""
        if self.arch.moe is None:
            return 0
        return sum(unfuse_experts(block, self.arch.moe) is not None for block in self.blocks)

    def refuse_experts(self) -> None:
        if self.arch.moe is not None:
            for block in self.blocks:
                refuse_experts(block, self.arch.moe)

    def experts(self, index: int):
        return experts_of(self.blocks[index], self.arch.moe)

    @staticmethod
    def _resolve(block: nn.Module, group: LinearGroup) -> ResolvedGroup | None:
        linears = {n: get_submodule(block, n) for n in group.linears}
        linears = {n: m for n, m in linears.items() if m is not None and is_linear(m)}
        if not linears:
            return None
        prev = get_submodule(block, group.prev) if group.prev else None
        width = {in_features(m) for m in linears.values()}
        if prev is not None and is_linear(prev) and {out_features(prev)} != width:
            prev = None  # e.g. grouped-query attention: v_proj is narrower than o_proj's input
        inspect = get_submodule(block, group.inspect) if group.inspect else None
        return ResolvedGroup(
            linears=linears,
            prev_name=group.prev if prev is not None else None,
            prev=prev,
            inspect_name=group.inspect if inspect is not None else None,
            inspect=inspect,
            stage=group.stage,
            shift_passes=group.shift_passes,
        )

    # ------------------------------------------------------------------ head
    def final_norm(self) -> tuple[str, nn.Module] | tuple[None, None]:
        for path in self.arch.final_norm:
            mod = get_submodule(self.model, path)
            if mod is not None:
                return path, mod
        return None, None

    def pooler(self) -> tuple[str, nn.Module] | tuple[None, None]:
        for path in self.arch.pooler:
            mod = get_submodule(self.model, path)
            if mod is not None:
                return path, mod
        return None, None

    def head_modules(self) -> dict[str, nn.Module]:
        """What runs after the last block, by name: the final norm, the output projection, the pooler."""
        found = (self.final_norm(), self.lm_head(), self.pooler())
        return {name: module for name, module in found if module is not None}

    def lm_head(self) -> tuple[str, nn.Module] | tuple[None, None]:
        if self.arch.lm_head:
            mod = get_submodule(self.model, self.arch.lm_head)
            if mod is not None:
                return self.arch.lm_head, mod
        return None, None
