import pytest
import torch

from lowbit.vq import (
    BSQ,
    FSQ,
    LFQ,
    GroupedResidualVQ,
    ProductQuantize,
    ResidualVQ,
    VectorQuantize,
    VQConfig,
)
from lowbit.vq.digits import DigitsConfig, make_quantizer


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: VectorQuantize(dim=4, codebook_size=1), "codebook_size"),
        (lambda: VectorQuantize(dim=0, codebook_size=8), "dim"),
        (lambda: VectorQuantize(dim=4, codebook_size=8, distance="manhattan"), "distance"),
        (lambda: VectorQuantize(dim=4, codebook_size=8, gradient="gumbel"), "gradient"),
        (lambda: VectorQuantize(dim=4, codebook_size=8, decay=1.0), "decay"),
        (lambda: VectorQuantize(dim=4, codebook_size=8, commitment_weight=-1), "commitment_weight"),
        (lambda: VectorQuantize(dim=4, codebook_size=8, dead_code_threshold=-1), "dead_code_threshold"),
        (lambda: VectorQuantize(dim=4, codebook_size=8, simvq=True), "simvq"),  # SimVQ needs ema=False
        (lambda: FSQ(levels=[4, 1, 4]), "levels"),
        (lambda: FSQ(levels=[]), "levels"),
        (lambda: FSQ(levels=[4, 4], dim=3), "dim"),
        (lambda: FSQ(levels=[4, 4], bound="jax"), "bound"),
        (lambda: FSQ(levels=[4, 4], entropy_weight=-0.1), "entropy_weight"),
        (lambda: FSQ(levels=[4, 4], entropy_weight=0.1, temperature=0), "temperature"),
        (lambda: FSQ(levels=[4, 4], entropy_weight=0.1, entropy_every=0), "entropy_every"),
        (lambda: FSQ(levels=[4, 4], diversity_gamma=-1), "diversity_gamma"),
        (lambda: FSQ(levels=[4, 4], exact_entropy_max_codes=-1), "exact_entropy_max_codes"),
        (lambda: LFQ(dim=0), "dim"),
        (lambda: BSQ(dim=8, temperature=0), "temperature"),
        (lambda: ResidualVQ(dim=4, num_quantizers=0, codebook_size=8), "num_quantizers"),
        (lambda: ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, quantizer_dropout=1.5), "quantizer_dropout"),
        (lambda: ResidualVQ(dim=4, num_quantizers=2, codebook_size=1), "codebook_size"),
        (lambda: ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, vq={"no_such_option": 1}), "vq"),
        (lambda: GroupedResidualVQ(dim=6, groups=4, num_quantizers=2, codebook_size=8), "dim"),
        (lambda: ProductQuantize(dim=10, num_subvectors=4, codebook_size=8), "dim"),
        (lambda: ProductQuantize(dim=8, num_subvectors=2, codebook_size=8, vq={"decay": 2.0}), "decay"),
        (lambda: DigitsConfig(steps=0), "steps"),
        (lambda: make_quantizer("kmeans"), "quantizer"),
    ],
)
def test_bad_config_names_the_field(build, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        build()


def test_config_object_and_overrides():
    cfg = VQConfig(dim=4, codebook_size=8)
    q = VectorQuantize(cfg, distance="cosine")
    assert q.config.distance == "cosine" and q.config.codebook_size == 8 and cfg.distance == "euclidean"
    with pytest.raises(TypeError):
        VectorQuantize(dim=4, codebook_size=8, no_such_option=True)


def test_bad_inputs_give_clear_errors():
    q = VectorQuantize(dim=4, codebook_size=8, channel_dim=1)
    with pytest.raises(ValueError, match=r"expects 4 channels on axis 1, got shape \(2, 3, 5\)"):
        q(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="at least 2 dims"):
        q(torch.randn(4))
    with pytest.raises(ValueError, match="channel_dim=3 is out of range for a 2-d input"):
        VectorQuantize(dim=4, codebook_size=8, channel_dim=3)(torch.randn(2, 4))
    with pytest.raises(TypeError, match="floating-point"):
        q(torch.ones(2, 4, 3, dtype=torch.long))
    rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=8)
    with pytest.raises(ValueError, match="trailing axis of 3 codebooks"):
        rvq.indices_to_codes(torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        rvq.indices_to_codes(torch.zeros(5, 3))
