"""Half-precision models compute in float32 on CPUs without half-precision instructions, and keep
their own dtypes."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms import GPTQ
from lowbit.models import dtypes
from lowbit.models.dtypes import arithmetic_dtype
from lowbit.pipeline import BlockInputs, QuantState, Unit
from lowbit.pipeline.tensors import computing_in
from tests.conftest import build_family, random_ids


@pytest.mark.parametrize(
    ("flags", "device", "dtype", "expected"),
    [
        (set(), "cpu", torch.bfloat16, torch.float32),
        (set(), "cpu", torch.float16, torch.float32),
        (set(), "cpu", torch.float32, torch.float32),
        ({"avx512_bf16"}, "cpu", torch.bfloat16, torch.bfloat16),
        ({"amx_bf16"}, "cpu", torch.float16, torch.float32),
        ({"avx512_fp16"}, "cpu", torch.float16, torch.float16),
        (set(), "cuda", torch.bfloat16, torch.bfloat16),
    ],
)
def test_arithmetic_dtype_follows_the_cpus_instructions(monkeypatch, flags, device, dtype, expected):
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset(flags))
    assert arithmetic_dtype(dtype, device) == expected


def test_computing_in_restores_each_tensors_own_dtype():
    block = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.LayerNorm(8))  # mixed, as keep-in-fp32 norms
    block.register_buffer("steps", torch.tensor([3]))
    params = list(block.parameters())
    before = [p.detach().clone() for p in params]
    with computing_in([block, None], torch.float32):
        assert all(p.dtype == torch.float32 for p in block.parameters())
        assert block.steps.dtype == torch.int64  # not floating: untouched
        assert [id(p) for p in block.parameters()] == [id(p) for p in params]
    assert [p.dtype for p in block.parameters()] == [b.dtype for b in before]
    assert all(torch.equal(p, b) for p, b in zip(block.parameters(), before))


def test_unit_computes_in_its_dtype_and_returns_the_inputs_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(16, 16)  # float32: the unit's compute dtype
    x = torch.randn(2, 5, 16).to(torch.bfloat16)
    seen = []
    linear.register_forward_pre_hook(lambda _m, a: seen.append(a[0].dtype))
    unit = Unit(
        name="b",
        index=0,
        module=linear,
        linears={"b": linear},
        groups=[],
        state=QuantState(),
        inputs=BlockInputs([x], [()], [{}]),
        forward=lambda h, a, kw: linear(h),
        device=torch.device("cpu"),
        compute_dtype=torch.float32,
    )
    (out,) = unit.run()
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    assert torch.equal(out, linear(x.float()).to(torch.bfloat16))


def test_a_bf16_model_quantized_in_float32_matches_its_float32_copy_and_stays_bf16():
    """The fp32 arithmetic is the fp32 model's: GPTQ's codes for the first block of a bf16 model
    computed in float32 equal those of the same weights held in float32 (later blocks see
    activations rounded to bf16 between blocks, and drift apart as in any bf16 run), where bf16
    arithmetic already changes 5-20% of them. The model keeps its dtypes (an fp32 norm included)."""
    model = build_family("llama").to(torch.bfloat16)
    model.model.layers[0].input_layernorm.float()
    bf16_arithmetic = copy.deepcopy(model)
    reference = copy.deepcopy(model).float()
    ids = random_ids(8, 32, vocab=128)
    step = GPTQ(format="int4", group_size=32, symmetric=False)
    runs = {
        "fp32 model": lowbit.quantize(reference, step, calibration=ids, keep_codes=True, progress=False),
        "fp32 arithmetic": lowbit.quantize(
            model, step, calibration=ids, keep_codes=True, progress=False, compute_dtype=torch.float32
        ),
        "bf16 arithmetic": lowbit.quantize(
            bf16_arithmetic, step, calibration=ids, keep_codes=True, progress=False, compute_dtype=torch.bfloat16
        ),
    }
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.layers[1].input_layernorm.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16

    def first_block_agreement(run: str) -> float:
        agree = total = 0
        for name, q in runs["fp32 model"].quantized.items():
            if name.startswith("model.layers.0."):
                agree += int((q.codes == runs[run].quantized[name].codes).sum())
                total += q.codes.numel()
        return agree / total

    assert first_block_agreement("fp32 arithmetic") > 0.999
    assert first_block_agreement("bf16 arithmetic") < 0.99
