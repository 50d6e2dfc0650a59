import pytest
import torch

from lowbit.algorithms import HQQ, StepConfigError
from lowbit.algorithms.hqq import HQQConfig, hqq_quantize, shrink_lp
from lowbit.formats import Quantizer


def test_shrinkage_is_the_lp_proximal_step():
    x = torch.tensor([-3.0, -0.01, 0.0, 0.01, 3.0])
    y = shrink_lp(x, beta=10.0, p=0.7)
    assert torch.all(y.abs() <= x.abs())
    assert y[1] == 0 and y[3] == 0  # small errors are zeroed
    assert torch.allclose(y[4], torch.tensor(3.0 - 3.0 ** (-0.3) / 10))


@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 64), (2, 32)])
def test_hqq_beats_rtn_in_the_norms_it_targets(bits, gs):
    torch.manual_seed(bits)
    W = torch.randn(256, 256)
    W[::9, ::17] *= 10  # outliers
    cfg = HQQConfig(format="int", bits=bits, group_size=gs)
    q = Quantizer(cfg.spec)
    hqq = q.dequantize(hqq_quantize(W, q, cfg))
    rtn = q.dequantize(q.quantize(W))
    for p in (0.7, 1.0):
        assert ((W - hqq).abs() ** p).mean() < ((W - rtn).abs() ** p).mean()
    # zero-points are fractional and stored at fp16
    qt = hqq_quantize(W, q, cfg)
    assert torch.equal(qt.zero, qt.zero.half().float())
    assert not torch.equal(qt.zero, qt.zero.round())


def test_hqq_needs_an_asymmetric_integer_format():
    with pytest.raises(StepConfigError, match="hqq.*asymmetric integer"):
        HQQ(format="int4", symmetric=True)
    with pytest.raises(StepConfigError, match="hqq.*symmetric=False.*nf4"):
        HQQ(format="nf4")
    with pytest.raises(StepConfigError, match="zero_dtype"):
        HQQ(format={"kind": "int", "bits": 4, "symmetric": False, "zero_dtype": "int"})
