"""Half-precision models compute in float32 on CPUs without half-precision instructions, and keep
their own dtypes."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

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
    """Linears keep their stored weights and multiply in the compute dtype; other modules are cast
    in place; everything is back in its own dtype afterwards, even a weight an algorithm replaced."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.LayerNorm(8))  # mixed, as keep-in-fp32 norms
    block.register_buffer("steps", torch.tensor([3]))
    params = list(block.parameters())
    before = [p.detach().clone() for p in params]
    x = torch.randn(3, 8)
    with computing_in([block, None], torch.float32):
        assert block[0].weight.dtype == torch.bfloat16  # no float32 copy of the block
        assert block[1].weight.dtype == torch.float32
        assert block.steps.dtype == torch.int64  # not floating: untouched
        assert [id(p) for p in block.parameters()] == [id(p) for p in params]
        y = block[0](x)
        assert y.dtype == torch.float32
        expected = x.double() @ before[0].double().T + before[1].double()
        assert torch.allclose(y.double(), expected, atol=1e-5)  # float32 arithmetic, not bf16's
        block[0].weight.data = block[0].weight.data.float()  # as an algorithm writing float32 values
    assert [p.dtype for p in block.parameters()] == [b.dtype for b in before]
    assert all(torch.equal(p, b) for p, b in zip(block.parameters(), before))
    assert "forward" not in vars(block[0])


def test_a_wide_linear_casts_its_weight_a_slice_at_a_time(monkeypatch):
    from lowbit.pipeline import tensors

    torch.manual_seed(0)
    linear = nn.Linear(16, 40).to(torch.bfloat16)
    x = torch.randn(2, 5, 16)
    with computing_in([linear], torch.float32):
        whole = linear(x)
    monkeypatch.setattr(tensors, "UPCAST_SLICE_BYTES", 16 * 4 * 3)  # three rows per slice
    with computing_in([linear], torch.float32):
        sliced = linear(x)
    expected = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert sliced.shape == whole.shape == (2, 5, 40)
    assert torch.allclose(sliced.double(), expected, atol=1e-5)
    assert torch.allclose(sliced, whole, atol=1e-6)


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
    """The fp32 arithmetic is the fp32 model's: GPTQ's codes for the layers that read the first
    block's inputs (q, k, v) of a bf16 model computed in float32 equal those of the same weights
    held in float32, where bf16 arithmetic changes 0.5-2% of them. Later layers see the earlier
    ones' quantized weights as the bf16 model stores them (rounded to bf16, as the saved model
    computes), so they drift from the fp32 model's, less than with bf16 arithmetic. The model keeps
    its dtypes (an fp32 norm included)."""
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

    def agreement(run: str, layers: tuple[str, ...]) -> float:
        agree = total = 0
        for name, q in runs["fp32 model"].quantized.items():
            if name.startswith("model.layers.0.") and name.endswith(layers):
                agree += int((q.codes == runs[run].quantized[name].codes).sum())
                total += q.codes.numel()
        return agree / total

    first = ("q_proj", "k_proj", "v_proj")
    assert agreement("fp32 arithmetic", first) == 1.0
    assert agreement("bf16 arithmetic", first) < 0.995
    assert agreement("fp32 arithmetic", ("",)) > agreement("bf16 arithmetic", ("",))


def test_a_large_head_computes_its_float32_logits_a_slice_at_a_time():
    """The sanity check's head in float32: cast whole when small, in vocabulary slices when its
    float32 copy would exceed the budget; the logits agree either way (and are float32's)."""
    from lowbit.pipeline.sanity import _upcast_head

    torch.manual_seed(0)
    head = nn.Linear(16, 100, bias=True).to(torch.bfloat16)
    norm = nn.LayerNorm(16)
    h = torch.randn(2, 3, 16)
    expected = F.linear(norm(h).double(), head.weight.double(), head.bias.double())
    whole = _upcast_head(norm, head, torch.float32)(h)
    sliced = _upcast_head(norm, head, torch.float32, budget=16 * 4 * 7)(h)  # 7 rows per slice
    assert whole.dtype == sliced.dtype == torch.float32
    assert torch.allclose(whole, sliced, atol=1e-6)  # BLAS may block the two products differently
    assert torch.allclose(whole.double(), expected, atol=1e-5)
