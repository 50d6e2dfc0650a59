"""The check before saving, on the real reference LM."""

import pytest

from lowbit.algorithms import RTN
from lowbit.api import quantize_checkpoint
from lowbit.pipeline import PipelineOptions, SanityCheckFailed, SanityThresholds

OPTS = PipelineOptions(progress=False, sanity_samples=4)
# reference-lm is robust: binary RTN still keeps half its top-1 predictions (KL about 0.43)
STRICT = PipelineOptions(progress=False, sanity_samples=4, sanity=SanityThresholds(max_kl=0.2))


def test_a_healthy_model_passes(tmp_path):
    run = quantize_checkpoint(
        "reference-lm", [RTN(format="int8", group_size=-1)], tmp_path / "ok", seq_len=64, options=OPTS
    )
    assert run.sanity.passed and run.sanity.kl < 0.01 and run.sanity.top1_agreement > 0.95
    assert run.sanity.tokens == 4 * 64
    assert run.report.extra["sanity"]["passed"]


def test_a_broken_model_is_not_saved_unless_forced(tmp_path):
    out = tmp_path / "broken"
    with pytest.raises(SanityCheckFailed, match=r"sanity check failed: KL divergence above 0.2 .*nothing was saved"):
        quantize_checkpoint("reference-lm", [RTN(format="binary")], out, seq_len=64, options=STRICT)
    assert not out.exists()
    run = quantize_checkpoint("reference-lm", [RTN(format="binary")], out, seq_len=64, options=STRICT, force=True)
    assert not run.sanity.passed and run.out_dir.exists()


def test_cli_threshold_refuses_and_force_saves(tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "q"
    args = ["quantize", "reference-lm", "--out", str(out), "--format", "binary", "--seq-len", "64", "--json"]
    assert main([*args, "--sanity-max-kl", "0.2"]) == 1  # a failed check is not a usage error
    assert "KL divergence above 0.2" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--sanity-max-kl", "0.2", "--force"]) == 0
    assert out.exists()
