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


def test_blockwise_greedy_generation_matches_transformers_generate(tmp_path):
    """The check's generation (block by block, streamed from disk) is the model's own greedy one."""
    import torch

    from lowbit import load_model

    run = quantize_checkpoint("reference-lm", [RTN(format="int4")], tmp_path / "q", seq_len=64, options=OPTS)
    rep = run.sanity
    assert len(rep.generated_ids) == len(rep.generated_ids_reference) == 8
    assert rep.generation and rep.generation_reference  # decoded with the tokenizer
    prompt = torch.tensor([rep.prompt_ids])
    assert len(rep.prompt_ids) == 16 and rep.prompt
    for name, expected in (("reference-lm", rep.generated_ids_reference), (run.out_dir, rep.generated_ids)):
        model = load_model(name, dtype=torch.float32).model
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
        assert out[0, 16:].tolist() == expected


def test_a_model_that_repeats_one_token_fails_the_generation_check():
    import torch

    from lowbit.pipeline.sanity import SanityTracker
    from lowbit.pipeline.unit import BlockInputs

    hidden = [torch.randn(1, 8, 4)]
    tracker = SanityTracker(BlockInputs(hidden, [()], [{}]))
    tracker.generated_reference = [3, 1, 4, 1, 5, 9, 2, 6]
    head = torch.nn.Linear(4, 10)
    rep = tracker.report(head, SanityThresholds(), generated=[7] * 8)
    assert not rep.passed and rep.collapsed and "repeats one token" in rep.reason
    assert tracker.report(head, SanityThresholds(), generated=[3, 1, 4, 1, 5, 9, 2, 7]).passed
    tracker.generated_reference = [7] * 8  # the original repeats itself too: not the quantization's fault
    assert tracker.report(head, SanityThresholds(), generated=[7] * 8).passed


def test_streaming_never_holds_embeddings_and_head_at_once(tmp_path, monkeypatch):
    """For a large vocabulary each is several blocks' worth: the generation swaps them."""
    from lowbit.models import ModelAdapter
    from lowbit.pipeline.store import StreamingStore

    loads = []

    def materialized(adapter: ModelAdapter) -> tuple[bool, bool]:
        embed = adapter.model.get_input_embeddings().weight
        head = adapter.lm_head()[1].weight
        return embed.device.type != "meta", head.device.type != "meta"

    def spy(original, kind):
        def wrapper(self, adapter, *args):
            original(self, adapter, *args)
            loads.append(kind)
            assert materialized(adapter) != (True, True), f"embeddings and head both in memory after {kind}"

        return wrapper

    monkeypatch.setattr(StreamingStore, "load_outside", spy(StreamingStore.load_outside, "embeddings"))
    monkeypatch.setattr(StreamingStore, "load_head", spy(StreamingStore.load_head, "head"))
    run = quantize_checkpoint("reference-lm", [RTN(format="int8")], tmp_path / "q", seq_len=64, options=OPTS)
    assert run.sanity.passed and len(run.sanity.generated_ids) == 8
    assert loads.count("embeddings") >= 16 and loads.count("head") >= 16  # once per new token, both generations


def test_generation_with_a_quantized_head_uses_it(tmp_path):
    """A quantized head lives only in memory until the end: the generation keeps it, and it is saved."""
    import torch

    from lowbit import load_model

    run = quantize_checkpoint(
        "reference-lm", [RTN(format="int4", ignore=[])], tmp_path / "q", seq_len=64, options=OPTS, force=True
    )
    assert "lm_head" in [r.name for r in run.report.layers]
    rep = run.sanity
    model = load_model(run.out_dir, dtype=torch.float32).model
    original = load_model("reference-lm", dtype=torch.float32).model
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight)  # the quantized head was saved
    prompt = torch.tensor([rep.prompt_ids])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert out[0, 16:].tolist() == rep.generated_ids
