"""Transformer architectures described as data, and the registry that maps a config to one.

An :class:`Architecture` says where the blocks are and, inside a block, which linear layers share
an input and which module produces that input (a norm or another linear). Algorithms that move
scales between layers (AWQ, SmoothQuant, rotations) read these groups; algorithms that only need
"every linear in the block" (RTN, GPTQ, HQQ) find linears by type and need nothing more.

Register a new family with :func:`register_architecture`::

    from lowbit.models import Architecture, LinearGroup, register_architecture
    register_architecture(Architecture(
        name="my-llama-like",
        model_types=("my_model",),
        block_paths=("model.layers",),
        groups=(LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), prev="input_layernorm"),),
    ))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .moe import MoESpec


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers (block-relative names) that read the same input.

    Attributes:
        linears: the layers.
        prev: the module whose output is that input, if a per-channel scale can be folded into it
            (a norm's weight, or a linear's output rows); ``None`` when it cannot (e.g. a post-LN
            norm that also feeds the residual, or a non-homogeneous activation in between).
        inspect: a module whose output measures the group's error (AWQ compares it before and
            after scaling); defaults to the linears' own outputs.
        stage: groups with the same stage are independent of each other (e.g. the experts of a
            MoE block) and can be calibrated in one pass.
        shift_passes: a constant added to ``prev``'s output (a linear) reaches the linears' input
            unchanged, so a per-channel shift can be folded too (Outlier Suppression+): v -> o
            through attention, whose weights sum to one; not through a gate or an activation.
            Norms always pass a shift (into their bias).
    """

    linears: tuple[str, ...]
    prev: str | None = None
    inspect: str | None = None
    stage: str | None = None
    shift_passes: bool = False


@dataclass(frozen=True)
class ResidualStream:
    """How a pre-norm block writes the residual stream, for rotations of it (QuaRot): the linears that
    read it through a norm are the groups whose ``prev`` is a norm; these are the rest.

    Attributes:
        writers: linears whose output is added to the residual stream (block-relative names).
        mlp_out: the MLP's output projection, whose input may take an online Hadamard transform.
        values: ``(v_proj, o_proj)``: attention mixes tokens, not channels, so a per-head rotation
            of v's outputs is undone in o's inputs offline.
    """

    writers: tuple[str, ...]
    mlp_out: str | None = None
    values: tuple[str, str] | None = None


@dataclass(frozen=True)
class Architecture:
    """Where the parts of one model family are (paths relative to the loaded model).

    Attributes:
        name: the family's name.
        model_types: ``config.model_type`` values this description applies to.
        block_paths: candidate paths of the ``ModuleList`` of blocks; the first that exists wins
            (e.g. ``model.layers`` for ``*ForCausalLM`` and ``layers`` for the bare ``*Model``).
        groups: linears sharing an input, per block.
        final_norm: candidate paths of the norm after the last block.
        lm_head: path of the output projection, if any.
        pooler: candidate paths of an encoder's pooler (BERT: a linear and tanh on the first
            token's final hidden state); its linears are calibrated on the last block's outputs.
        norm_offset: RMSNorms of this family compute ``x * (offset + weight)`` (Gemma: 1).
        moe: where the fused Mixture-of-Experts module is, if any.
        residual: how blocks write the residual stream, for families whose residual stream can be
            rotated (pre-norm with RMSNorm, nothing but the writers' outputs added to it); ``None``:
            rotations refuse the family.
    """

    name: str
    model_types: tuple[str, ...]
    block_paths: tuple[str, ...]
    groups: tuple[LinearGroup, ...] = ()
    final_norm: tuple[str, ...] = ()
    lm_head: str | None = "lm_head"
    pooler: tuple[str, ...] = ()
    norm_offset: float = 0.0
    moe: MoESpec | None = None
    residual: ResidualStream | None = None
    notes: str = field(default="", compare=False)


_REGISTRY: dict[str, Architecture] = {}


class UnsupportedArchitectureError(ValueError):
    """The model's family has no registered :class:`Architecture`."""


def register_architecture(arch: Architecture, *, replace: bool = False) -> Architecture:
    """Make ``arch`` known for each of its ``model_types``."""
    for model_type in arch.model_types:
        if model_type in _REGISTRY and not replace:
            raise ValueError(f"model_type {model_type!r} is already registered (as {_REGISTRY[model_type].name!r})")
        _REGISTRY[model_type] = arch
    return arch


def registered_model_types() -> list[str]:
    return sorted(_REGISTRY)


def architecture_for(config, class_name: str = "?") -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    raise UnsupportedArchitectureError(
        f"lowbit does not know the architecture of {class_name} (model_type={model_type!r}); "
        "register it with lowbit.models.register_architecture(Architecture(...)). "
        f"Known model types: {', '.join(registered_model_types())}"
    )


# ----------------------------------------------------------------------------- built-in families
_ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


_LLAMA_RESIDUAL = ResidualStream(
    writers=("self_attn.o_proj", "mlp.down_proj"),
    mlp_out="mlp.down_proj",
    values=("self_attn.v_proj", "self_attn.o_proj"),
)


def _llama_like(
    name: str,
    model_types: tuple[str, ...],
    norm_offset: float = 0.0,
    mlp_norm: str = "post_attention_layernorm",
    residual: ResidualStream | None = _LLAMA_RESIDUAL,
) -> Architecture:
    return Architecture(
        name=name,
        model_types=model_types,
        block_paths=("model.layers", "layers", "model.language_model.layers"),
        groups=(
            LinearGroup(_ATTN_QKV, prev="input_layernorm", inspect="self_attn"),
            LinearGroup(("self_attn.o_proj",), prev="self_attn.v_proj", shift_passes=True),
            LinearGroup(_MLP_GATE_UP, prev=mlp_norm, inspect="mlp"),
            LinearGroup(("mlp.down_proj",), prev="mlp.up_proj"),
        ),
        final_norm=("model.norm", "norm"),
        norm_offset=norm_offset,
        residual=residual,
    )


register_architecture(_llama_like("llama", ("llama",)))
register_architecture(_llama_like("mistral", ("mistral",)))
register_architecture(_llama_like("qwen2", ("qwen2",)))
register_architecture(_llama_like("qwen3", ("qwen3",)))
register_architecture(_llama_like("gemma", ("gemma",), norm_offset=1.0))
# Gemma 2/3 normalise the attention and MLP outputs before adding them to the residual stream: a
# rotation of the stream does not pass through those norms' per-channel weights.
register_architecture(
    _llama_like(
        "gemma2", ("gemma2", "gemma3_text"), norm_offset=1.0, mlp_norm="pre_feedforward_layernorm", residual=None
    )
)

register_architecture(
    Architecture(
        name="phi3",
        model_types=("phi3",),
        block_paths=("model.layers", "layers"),
        groups=(
            LinearGroup(("self_attn.qkv_proj",), prev="input_layernorm", inspect="self_attn"),
            LinearGroup(("self_attn.o_proj",)),
            LinearGroup(("mlp.gate_up_proj",), prev="post_attention_layernorm", inspect="mlp"),
            LinearGroup(("mlp.down_proj",)),
        ),
        final_norm=("model.norm", "norm"),
        residual=ResidualStream(writers=("self_attn.o_proj", "mlp.down_proj"), mlp_out="mlp.down_proj"),
        notes="fused qkv and gate_up: v->o and up->down scales cannot be folded",
    )
)

register_architecture(
    Architecture(
        name="opt",
        model_types=("opt",),
        block_paths=("model.decoder.layers", "decoder.layers"),
        groups=(
            LinearGroup(_ATTN_QKV, prev="self_attn_layer_norm", inspect="self_attn"),
            LinearGroup(("self_attn.out_proj",), prev="self_attn.v_proj", shift_passes=True),
            # ReLU is positively homogeneous, so fc1's output rows can absorb fc2's input scale.
            LinearGroup(("fc1",), prev="final_layer_norm"),
            LinearGroup(("fc2",), prev="fc1"),
        ),
        final_norm=("model.decoder.final_layer_norm", "decoder.final_layer_norm"),
    )
)

register_architecture(
    Architecture(
        name="gpt2",
        model_types=("gpt2",),
        block_paths=("transformer.h", "h"),
        groups=(
            LinearGroup(("attn.c_attn",), prev="ln_1", inspect="attn"),
            LinearGroup(("attn.c_proj",)),
            LinearGroup(("mlp.c_fc",), prev="ln_2"),
            LinearGroup(("mlp.c_proj",)),
        ),
        final_norm=("transformer.ln_f", "ln_f"),
    )
)

register_architecture(
    Architecture(
        name="gpt_neox",
        model_types=("gpt_neox",),
        block_paths=("gpt_neox.layers", "layers"),
        groups=(
            LinearGroup(("attention.query_key_value",), prev="input_layernorm", inspect="attention"),
            LinearGroup(("attention.dense",)),
            LinearGroup(("mlp.dense_h_to_4h",), prev="post_attention_layernorm"),
            LinearGroup(("mlp.dense_4h_to_h",)),
        ),
        final_norm=("gpt_neox.final_layer_norm", "final_layer_norm"),
    )
)

register_architecture(
    Architecture(
        name="bert",
        model_types=("bert",),
        block_paths=("bert.encoder.layer", "encoder.layer"),
        groups=(
            # Post-LN: the norm before q/k/v also feeds the residual, so nothing can be folded into it.
            LinearGroup(("attention.self.query", "attention.self.key", "attention.self.value")),
            LinearGroup(("attention.output.dense",), prev="attention.self.value", shift_passes=True),
            LinearGroup(("intermediate.dense",)),
            LinearGroup(("output.dense",)),
        ),
        final_norm=(),
        lm_head=None,
        pooler=("bert.pooler", "pooler"),
    )
)

_MOE_ATTN = (
    LinearGroup(_ATTN_QKV, prev="input_layernorm", inspect="self_attn"),
    LinearGroup(("self_attn.o_proj",), prev="self_attn.v_proj", shift_passes=True),
)
register_architecture(
    Architecture(
        name="mixtral",
        model_types=("mixtral",),
        block_paths=("model.layers", "layers"),
        groups=_MOE_ATTN,
        final_norm=("model.norm", "norm"),
        moe=MoESpec(
            path="mlp.experts", model_prefix="mlp", checkpoint_prefix="block_sparse_moe", gate="w1", up="w3", down="w2"
        ),
    )
)
register_architecture(
    Architecture(
        name="qwen_moe",
        model_types=("qwen2_moe", "qwen3_moe"),
        block_paths=("model.layers", "layers"),
        groups=(
            *_MOE_ATTN,
            LinearGroup(("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),
            LinearGroup(("mlp.shared_expert.down_proj",), prev="mlp.shared_expert.up_proj"),
        ),
        final_norm=("model.norm", "norm"),
        moe=MoESpec(),
    )
)
