"""GGUF files for llama.cpp, written with the ``gguf`` package from a model lowbit quantized.

Quantized linears go in as llama.cpp blocks holding exactly lowbit's codes and scales
(:func:`ggml_blocks`, packed by :mod:`lowbit.formats.ggml`): a layer quantized onto a llama.cpp
grid (``q4_0`` ... ``q6_k``), or in a lowbit format that one of those grids contains (symmetric
INT4 / INT5 / INT8 with fp16 scales in groups of a multiple of 32 or per channel, as Q4_0 / Q5_0 /
Q8_0), is stored without loss. Anything else is
refused, naming the layer and the format to quantize to instead. The other tensors are written
in the checkpoint's float type (norms in F32, as llama.cpp expects).

Architectures: Llama and Mistral (``llama`` in llama.cpp: q/k rows reordered for its rotary
layout, which pairs adjacent dimensions where transformers pairs halves), Qwen2 and Qwen3. The
tokenizer becomes llama.cpp's vocabulary: byte-level BPE (GPT-2 family) with its merges, special
token ids, ``add_bos``/``add_eos`` and chat template (``gguf.SpecialVocab`` reads them).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..formats import FormatError, QuantizedTensor, ggml, make_format
from .layouts import ExportError, register_layout
from .lowbit_packed import LowbitPackedLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers family maps to a llama.cpp architecture."""

    name: str  # llama.cpp's architecture name
    permute_qk: bool  # rotary embedding on adjacent pairs in llama.cpp, on halves in transformers


ARCHS = {
    "llama": GGUFArch("llama", permute_qk=True),
    "mistral": GGUFArch("llama", permute_qk=True),
    "qwen2": GGUFArch("qwen2", permute_qk=False),
    "qwen3": GGUFArch("qwen3", permute_qk=False),
}


def ggml_blocks(q: QuantizedTensor) -> tuple[np.ndarray, int]:
    """``q`` as llama.cpp blocks: a uint8 array ``[rows, bytes per row]`` and its ggml type id.
    Raises :class:`ExportError` when no llama.cpp type holds ``q``'s values exactly."""
    if q.spec.ggml_type is None:
        q = _as_legacy_blocks(q)
    try:
        return ggml.to_ggml_bytes(q), ggml.ggml_type(q.spec).type_id
    except FormatError as exc:
        raise ExportError(str(exc)) from None


def _as_legacy_blocks(q: QuantizedTensor) -> QuantizedTensor:
    """A symmetric INT4/INT5/INT8 tensor with fp16 scales per group of a multiple of 32 (or per
    channel) as Q4_0/Q5_0/Q8_0: the same codes, each group's scale repeated for its blocks of 32."""
    s = q.spec
    cols = q.shape[1]
    group = s.group_size if s.granularity == "group" else cols if s.granularity == "channel" else 0
    if (
        s.kind != "int"
        or s.bits not in (4, 5, 8)
        or s.has_zero_point
        or s.scale_dtype != "float16"
        or not group
        or group % 32
        or q.g_idx is not None
    ):
        raise ExportError(
            f"no llama.cpp type holds {s.label()} exactly: quantize onto one of llama.cpp's grids "
            "(--format q4_0, q4_1, q5_0, q5_1, q8_0, q2_k ... q6_k), or symmetric INT4/5/8 with fp16 scales "
            "per group of 32, 64, 128 ... (Q4_0/Q5_0/Q8_0)"
        )
    return QuantizedTensor(
        codes=q.codes,
        scale=q.scale.repeat_interleave(group // 32, dim=1),
        zero=None,
        global_scale=None,
        spec=make_format(f"q{s.bits}_0"),
        shape=q.shape,
    )


def _rows_permuted(q: QuantizedTensor, heads: int) -> QuantizedTensor:
    """``q`` with llama.cpp's rotary row order: in each head, rows ``(i, hd/2 + i)`` become ``(2i, 2i+1)``
    (rows carry their own parameters, so the values are unchanged)."""
    rows = q.shape[0]
    order = torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)
    if q.spec.granularity == "tensor":
        return replace(q, codes=q.codes[order])
    names = ("codes", "scale", "zero", "super_scale", "super_min")
    return replace(q, **{n: getattr(q, n)[order] for n in names if getattr(q, n) is not None})


def _permuted(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(model: nn.Module, tokenizer_dir: str | Path, out_file: str | Path, *, name: str | None = None) -> Path:
    """Write ``model`` (loaded by :func:`lowbit.load`, quantized layers packed) as a GGUF file,
    atomically (a temporary file in the same directory, then a rename)."""
    from ..runtime import PackedLinear

    config = model.config
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise ExportError(f"GGUF export supports {', '.join(sorted(ARCHS))} models, not {config.model_type!r}")
    if getattr(config, "lowbit_online_rotations", None):
        raise ExportError(
            "this model rotates some layers' inputs at run time (QuaRot's online Hadamard), which llama.cpp "
            "does not do: quantize it with `quarot: {online: false}` for GGUF"
        )
    out_file = Path(out_file)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], config.num_hidden_layers)
    tmp = out_file.with_name(f".{out_file.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), arch.name)
    try:
        _write_metadata(writer, config, head_dim, name or out_file.stem)
        _write_tokenizer(writer, Path(tokenizer_dir), config.vocab_size)
        file_types: dict[int, int] = {}
        tied = getattr(config, "tie_word_embeddings", False)
        for module_name, module in model.named_modules():
            params = {n: p for n, p in module.named_parameters(recurse=False)}
            if isinstance(module, PackedLinear):
                params = {"bias": module.bias} if module.bias is not None else {}
                target = _gguf_name(names, module_name, "weight")
                q = module.quantized()
                if arch.permute_qk and module_name.endswith(("q_proj", "k_proj")):
                    q = _rows_permuted(q, heads if module_name.endswith("q_proj") else kv_heads)
                try:
                    data, ggml_type = ggml_blocks(q)
                except ExportError as exc:
                    raise ExportError(f"{module_name}: {exc}") from None
                writer.add_tensor(target, data, raw_dtype=gguf.GGMLQuantizationType(ggml_type))
                file_types[ggml_type] = file_types.get(ggml_type, 0) + q.codes.numel()
            for leaf, p in params.items():
                if p is None or (tied and module_name.endswith("lm_head")):
                    continue
                t = p.detach().float()
                if arch.permute_qk and module_name.endswith(("q_proj", "k_proj")):
                    t = _permuted(t, heads if module_name.endswith("q_proj") else kv_heads)
                _add_dense(writer, _gguf_name(names, module_name, leaf), t, p.dtype)
        if file_types:
            main = max(file_types, key=file_types.get)
            writer.add_file_type(_llama_file_type(main))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s", out_file)
    return out_file


def _add_dense(writer, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    """A float tensor in the checkpoint's own type (vectors such as norms in F32, as llama.cpp wants)."""
    array = t.numpy()
    if t.ndim <= 1 or dtype == torch.float32:
        writer.add_tensor(name, array.astype(np.float32))
    elif dtype == torch.bfloat16:
        bf16 = gguf.GGMLQuantizationType.BF16
        writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), bf16), raw_dtype=bf16)
    else:
        writer.add_tensor(name, array.astype(np.float16))


def check_model(model_type: str) -> None:
    if model_type not in ARCHS:
        raise ExportError(f"GGUF export supports {', '.join(sorted(ARCHS))} models, not {model_type!r}")


def check_layer(layer: str, spec, step=None) -> None:
    """Raise :class:`ExportError` if a GGUF export cannot hold this layer (before any work)."""
    if step is not None and step.writes_group_index():
        raise ExportError(f"{layer}: llama.cpp blocks are contiguous columns; use {step.name} with static_groups: true")
    if spec.ggml_type is None:
        q = QuantizedTensor(torch.zeros(1, 32, dtype=torch.uint8), torch.ones(1, 1), None, None, spec, (1, 32))
        try:
            _as_legacy_blocks(q)
        except ExportError as exc:
            raise ExportError(f"{layer}: {exc}") from None


@register_layout
class GGUFLayout(LowbitPackedLayout):
    """``--save-format gguf``: the run writes lowbit's packed checkpoint (which lowbit reads back, e.g.
    for ``lowbit eval``) and, from it, ``model.gguf`` beside it; every layer is checked up front."""

    name = "gguf"
    holds_activations = False  # llama.cpp computes with float activations

    def check(self, layer, spec, module, step=None, q=None) -> None:
        check_layer(layer, spec, step)


def _gguf_name(names, module_name: str, leaf: str) -> str:
    mapped = names.get_name(module_name)
    if mapped is None:
        raise ExportError(f"no GGUF name for {module_name} (llama.cpp does not know this tensor)")
    return f"{mapped}.{leaf}"


def _write_metadata(writer, config, head_dim: int, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", config.num_attention_heads))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _write_tokenizer(writer, directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (``tokenizer.json``) as llama.cpp's ``gpt2`` vocabulary."""
    path = directory / "tokenizer.json"
    if not path.exists():
        raise ExportError(f"GGUF export needs the tokenizer's tokenizer.json in {directory}")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(spec.get("pre_tokenizer")):
        raise ExportError(
            "GGUF export handles byte-level BPE tokenizers (GPT-2 family); this one is "
            f"{model.get('type')} with pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:80]}"
        )
    by_id = {i: t for t, i in model["vocab"].items()}
    special = set()
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    types = [
        gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED
        for i in range(vocab_size)
    ]
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


def _byte_level(pre) -> bool:
    """A ByteLevel pre-tokenizer with GPT-2's split regex (llama.cpp's ``gpt-2`` pre-tokenizer type)."""
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        return len(parts) == 1 and _byte_level(parts[0])
    return False


def _llama_file_type(ggml_type: int):
    """llama.cpp's ``general.file_type`` for a file mostly of ``ggml_type`` (informational)."""
    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {
        q.Q4_0: f.MOSTLY_Q4_0,
        q.Q4_1: f.MOSTLY_Q4_1,
        q.Q5_0: f.MOSTLY_Q5_0,
        q.Q5_1: f.MOSTLY_Q5_1,
        q.Q8_0: f.MOSTLY_Q8_0,
        q.Q2_K: f.MOSTLY_Q2_K,
        q.Q3_K: f.MOSTLY_Q3_K_M,
        q.Q4_K: f.MOSTLY_Q4_K_M,
        q.Q5_K: f.MOSTLY_Q5_K_M,
        q.Q6_K: f.MOSTLY_Q6_K,
    }.get(ggml_type, f.GUESSED)
