import math

import pytest
import torch

from lowbit.vq import (
    FSQ,
    ResidualVQ,
    UsageMeter,
    bits_per_token,
    code_entropy_bits,
    code_histogram,
    codebook_utilization,
    perplexity,
)


def test_metrics_on_known_inputs():
    idx = torch.tensor([[0, 0], [1, 1]])  # two codes of four, equally often
    assert codebook_utilization(idx, 4) == 0.5
    assert code_entropy_bits(idx, 4) == pytest.approx(1.0)
    assert perplexity(idx, 4) == pytest.approx(2.0)
    uniform = torch.arange(8).repeat(3)
    assert codebook_utilization(uniform, 8) == 1.0
    assert perplexity(uniform, 8) == pytest.approx(8.0)
    assert code_entropy_bits(uniform, 8) == pytest.approx(3.0)
    skewed = torch.tensor([0, 0, 0, 1])  # p = (3/4, 1/4)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert code_entropy_bits(skewed, 2) == pytest.approx(h)
    assert perplexity(torch.zeros(10, dtype=torch.long), 16) == pytest.approx(1.0)


def test_bits_per_token():
    assert bits_per_token(256) == 8.0
    assert bits_per_token([16, 16]) == 8.0
    assert bits_per_token([1000]) == pytest.approx(math.log2(1000))
    assert FSQ(levels=[4, 4, 4, 4]).bits_per_token == 8.0
    assert ResidualVQ(dim=4, num_quantizers=3, codebook_size=32).bits_per_token == 15.0
    with pytest.raises(ValueError, match="codebook_sizes"):
        bits_per_token([0])


def test_histogram_ignores_dropped_stages_and_rejects_bad_indices():
    torch.testing.assert_close(
        code_histogram(torch.tensor([-1, 2, 2, -1]), 3), torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="out of range"):
        code_histogram(torch.tensor([5]), 4)
    with pytest.raises(TypeError):
        code_histogram(torch.tensor([0.5]), 4)


def test_usage_meter_accumulates_per_codebook():
    meter = UsageMeter([4, 4], multi_codebook=True)
    meter.update(torch.tensor([[0, 0], [1, 0]]))
    meter.update(torch.tensor([[2, 0], [3, -1]]))
    assert meter.per_codebook_utilization() == [1.0, 0.25]
    assert meter.utilization() == pytest.approx(0.625)
    assert meter.entropy_bits() == pytest.approx(2.0)  # 2 bits from the first codebook, 0 from the second
    assert meter.perplexity() == pytest.approx((4 + 1) / 2)
    assert meter.nominal_bits() == 4.0
    with pytest.raises(ValueError, match="2 codebooks"):
        meter.update(torch.tensor([[0, 0, 0]]))
    single = UsageMeter.for_quantizer(FSQ(levels=[2, 2]))
    single.update(torch.tensor([[0, 1], [2, 3]]))
    assert single.utilization() == 1.0
