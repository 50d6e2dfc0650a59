"""GPTQ and AutoAWQ checkpoints load into lowbit with their codes.

The checkpoints are written here by packers transcribed plainly from the formats' definitions (word by word, bit by
bit, in Python integers), not with lowbit's packing: lowbit's reader must recover exactly the codes, zero-points,
scales and act-order groups they were made from.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

import lowbit
from lowbit.formats import Quantizer, make_format
from lowbit.runtime import PackedLinear

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _words_lsb_first(values: list[int], bits: int) -> list[int]:
    """Values as one little-endian bit stream cut into 32-bit words (two's-complement int32)."""
    stream = 0
    for i, v in enumerate(values):
        stream |= v << (i * bits)
    n_words = (len(values) * bits + 31) // 32
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def _gptq_tensors(codes, zeros, scales, g_idx, bits, v1):
    out = codes.shape[0]
    qweight = torch.tensor([_words_lsb_first(codes[o].tolist(), bits) for o in range(out)], dtype=torch.int32).T
    stored = (zeros - 1 if v1 else zeros).long()  # [groups, out]
    qzeros = torch.tensor([_words_lsb_first(row.tolist(), bits) for row in stored], dtype=torch.int32)
    return {"qweight": qweight.contiguous(), "qzeros": qzeros, "scales": scales.half(), "g_idx": g_idx.int()}


def _awq_tensors(codes, zeros, scales):
    def pack(rows):  # [r, out] -> [r, out/8], nibble j of word c = column 8c + AWQ_ORDER[j]
        words = []
        for row in rows.tolist():
            line = []
            for c in range(len(row) // 8):
                line.extend(_words_lsb_first([row[8 * c + AWQ_ORDER[j]] for j in range(8)], 4))
            words.append(line)
        return torch.tensor(words, dtype=torch.int32)

    return {"qweight": pack(codes.T), "qzeros": pack(zeros.long()), "scales": scales.half()}


def _checkpoint(tmp_path, quant_config, make_tensors):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    state = {k: v.half() for k, v in model.state_dict().items()}
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            del state[f"{name}.weight"]
            tensors, dense = make_tensors(module.weight.shape, len(expected))
            state.update({f"{name}.{k}": v for k, v in tensors.items()})
            expected[name] = dense
    path = tmp_path / "ckpt"
    path.mkdir()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["quantization_config"] = quant_config
    cfg["dtype"] = "float16"
    (path / "config.json").write_text(json.dumps(cfg))
    return path, expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("v1,act_order,sym", [(True, False, True), (False, True, False), (False, False, False)])
def test_gptq_checkpoints_load_with_their_codes(tmp_path, bits, v1, act_order, sym):
    group = 32

    def make(shape, seed):
        gen = torch.Generator().manual_seed(seed)
        out, cols = shape
        codes = torch.randint(0, 2**bits, (out, cols), generator=gen)
        groups = cols // group
        zeros = (
            torch.full((groups, out), 2 ** (bits - 1))
            if sym
            else torch.randint(1, 2**bits, (groups, out), generator=gen)
        )
        scales = torch.rand(groups, out, generator=gen) * 0.01 + 0.001
        g_idx = torch.arange(cols) // group
        if act_order:
            g_idx = g_idx[torch.randperm(cols, generator=gen)]
        dense = (codes - zeros.T[:, g_idx]) * scales.half().float().T[:, g_idx]  # w = (q - z) * s, per column's group
        return _gptq_tensors(codes, zeros, scales, g_idx, bits, v1), dense

    config = {
        "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": sym,
        "checkpoint_format": "gptq" if v1 else "gptq_v2",
    }  # fmt: skip
    path, expected = _checkpoint(tmp_path, config, make)
    loaded = lowbit.load(path, dtype=torch.float32, native_kernels=False)
    for name, dense in expected.items():
        module = loaded.model.get_submodule(name)
        assert isinstance(module, PackedLinear)
        torch.testing.assert_close(module.dense_weight(), dense.float(), rtol=0, atol=0, msg=name)
        assert (module.quantized().g_idx is not None) == act_order


def test_awq_gemm_checkpoints_load_with_their_codes(tmp_path):
    def make(shape, seed):
        gen = torch.Generator().manual_seed(seed)
        out, cols = shape
        codes = torch.randint(0, 16, (out, cols), generator=gen)
        zeros = torch.randint(0, 16, (cols // 64, out), generator=gen)
        scales = torch.rand(cols // 64, out, generator=gen) * 0.01
        g = torch.arange(cols) // 64
        dense = (codes - zeros.T[:, g]) * scales.half().float().T[:, g]
        return _awq_tensors(codes, zeros, scales), dense

    config = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    path, expected = _checkpoint(tmp_path, config, make)
    loaded = lowbit.load(path, dtype=torch.float32)
    for name, dense in expected.items():
        module = loaded.model.get_submodule(name)
        assert module.kernel == "int4"  # asymmetric 4-bit runs in torch's int4 kernel
        torch.testing.assert_close(module.dense_weight(), dense.float(), rtol=0, atol=0, msg=name)
    q = loaded.model.model.layers[0].mlp.up_proj.quantized()
    assert q.spec == make_format("int4", group_size=64, symmetric=False, scale_dtype="float16", zero_dtype="int")
    torch.testing.assert_close(Quantizer(q.spec).dequantize(q), expected["model.layers.0.mlp.up_proj"].float())
