"""Models larger than memory: streaming from safetensors, resume after a kill, dry runs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.algorithms import GPTQ, RTN
from lowbit.api import quantize_checkpoint
from lowbit.pipeline import PipelineOptions, PlanError, ResumeMismatch
from tests.conftest import save_tiny_lm


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_streamed_result_equals_the_in_memory_result(tiny_lm_dir, tmp_path):
    recipe = [GPTQ(format="int4", group_size=32)]
    opts = PipelineOptions(progress=False, sanity_samples=0)
    run = quantize_checkpoint(
        tiny_lm_dir,
        recipe,
        tmp_path / "out",
        n_samples=8,
        seq_len=64,
        options=opts,
        save_dtype=torch.float32,
        save_format="fake",  # dense tensors, compared one by one (packed checkpoints: tests/export, tests/runtime)
    )
    streamed = _tensors(run.out_dir)
    loaded = lowbit.load_model(tiny_lm_dir)
    lowbit.quantize(loaded, recipe, calibration="builtin", n_samples=8, seq_len=64, options=opts)
    in_memory = loaded.model.state_dict()
    assert set(streamed) == set(in_memory)
    for k, v in streamed.items():
        assert torch.equal(v, in_memory[k]), k
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(run.out_dir)
    ids = torch.randint(0, 4000, (1, 12))
    assert torch.allclose(reloaded(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-5)


def test_resume_refuses_a_changed_recipe(tiny_lm_dir, tmp_path):
    from lowbit.export.shards import ShardWriter

    original = ShardWriter.write

    def crash(self, stem, tensors):
        if stem == "block-00001":
            raise KeyboardInterrupt
        return original(self, stem, tensors)

    opts = PipelineOptions(progress=False, sanity_samples=0)
    ShardWriter.write = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            quantize_checkpoint(tiny_lm_dir, [RTN(format="int4", group_size=32)], tmp_path / "out", options=opts)
    finally:
        ShardWriter.write = original
    with pytest.raises(ResumeMismatch, match="recipe changed"):
        quantize_checkpoint(tiny_lm_dir, [RTN(format="int3", group_size=32)], tmp_path / "out", options=opts)
    run = quantize_checkpoint(
        tiny_lm_dir, [RTN(format="int3", group_size=32)], tmp_path / "out", options=opts, restart=True
    )
    assert run.resumed_from_block == 0 and run.out_dir.exists()


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_resumed_run_checks_the_blocks_before_the_resume_with_their_input_quantizers(
    tiny_lm_dir, tmp_path, monkeypatch, dynamic
):
    """The final sanity check of a resumed W8A8 run runs the blocks finished before the interruption
    as they are saved (inputs quantized, static scales read from their shards): its KL and greedy
    continuation equal those of an uninterrupted run (the KL comes from the held-back samples' hidden
    states saved with the progress; the generation runs every block again)."""
    from lowbit.export.shards import ShardWriter

    acts = {"format": "int4", "dynamic": dynamic}  # coarse enough to change the greedy continuation
    recipe = [RTN(format="int8", group_size=-1, input_activations=acts)]
    opts = PipelineOptions(progress=False, sanity_samples=2)
    kwargs = {"n_samples": 8, "seq_len": 64, "options": opts, "force": True}
    reference = quantize_checkpoint(tiny_lm_dir, recipe, tmp_path / "ref", **kwargs)

    original = ShardWriter.write

    def crash_on_second_block(self, stem, tensors):
        if stem == "block-00001":
            raise RuntimeError("disk on fire")
        return original(self, stem, tensors)

    monkeypatch.setattr(ShardWriter, "write", crash_on_second_block)
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_checkpoint(tiny_lm_dir, recipe, tmp_path / "out", **kwargs)
    monkeypatch.setattr(ShardWriter, "write", original)
    resumed = quantize_checkpoint(tiny_lm_dir, recipe, tmp_path / "out", **kwargs)
    assert resumed.resumed_from_block == 1
    assert resumed.sanity.kl == reference.sanity.kl > 0
    assert resumed.sanity.generated_ids == reference.sanity.generated_ids


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    model = save_tiny_lm(tmp_path / "m", layers=12, hidden=128, intermediate=256)
    cmd = [
        sys.executable,
        "-m",
        "lowbit",
        "quantize",
        str(model),
        "--method",
        "gptq",
        "--group-size",
        "32",
        "--n-samples",
        "16",
        "--seq-len",
        "128",
        "--json",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = subprocess.run([*cmd, "--out", str(tmp_path / "ref")], capture_output=True, env=env, timeout=600)
    assert reference.returncode == 0, reference.stderr.decode()

    out = tmp_path / "out"
    run_file = tmp_path / ".out.partial" / "lowbit_run.json"
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    # wait for the event (four blocks recorded), however long the machine takes
    while not (run_file.exists() and json.loads(run_file.read_text() or "{}").get("next_block", 0) >= 4):
        assert proc.poll() is None, "the run ended before it could be killed mid-way"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert run_file.exists()
    resumed = subprocess.run([*cmd, "--out", str(out)], capture_output=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()
    a, b = _tensors(tmp_path / "ref"), _tensors(out)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_reports_the_plan_and_fails_fast(tiny_lm_dir, tmp_path, monkeypatch):
    opts = PipelineOptions(progress=False)
    run = quantize_checkpoint(
        tiny_lm_dir, [GPTQ(format="int4", group_size=32)], tmp_path / "out", options=opts, dry_run=True
    )
    plan = run.plan.to_dict()
    assert plan["blocks"] == 2 and len(plan["layers"]) == 14
    assert plan["estimated_peak_memory_bytes"] > 0 and plan["estimated_seconds"] > 0
    assert not (tmp_path / "out").exists()
    with pytest.raises(PlanError, match="group_size 48"):
        quantize_checkpoint(
            tiny_lm_dir, [GPTQ(format="int4", group_size=48)], tmp_path / "out", options=opts, dry_run=True
        )
    from lowbit.calibration import CalibrationError

    with pytest.raises(CalibrationError, match="only .* tokens"):
        short = tmp_path / "short.txt"
        short.write_text("too short")
        quantize_checkpoint(
            tiny_lm_dir, [GPTQ(group_size=32)], tmp_path / "out", calibration=str(short), options=opts, dry_run=True
        )

    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1, 1, 1000))
    with pytest.raises(PlanError, match="not enough disk space"):
        quantize_checkpoint(tiny_lm_dir, [RTN(group_size=32)], tmp_path / "out", options=opts, dry_run=True)


PEAK_SCRIPT = r"""
import json, sys, resource
from lowbit.api import quantize_checkpoint
from lowbit.algorithms import RTN
from lowbit.pipeline import PipelineOptions, store

baseline = {}
original = store.StreamingStore.load_block
def load_block(self, adapter, index):
    baseline.setdefault("kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # before the first block
    original(self, adapter, index)
store.StreamingStore.load_block = load_block
quantize_checkpoint(sys.argv[1], [RTN(format="int4", group_size=128)], sys.argv[2], options=PipelineOptions(progress=False, sanity_samples=0))
print(json.dumps({"baseline_kb": baseline["kb"], "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_streaming_peak_memory_stays_near_one_block(tmp_path):
    model = save_tiny_lm(tmp_path / "m", layers=12, hidden=512, intermediate=2048)
    block_bytes = (4 * 512 * 512 - 2 * 512 * 256 + 3 * 512 * 2048) * 4  # q,o + k,v (GQA) + MLP, fp32
    res = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(model), str(tmp_path / "out")], capture_output=True, timeout=600
    )
    assert res.returncode == 0, res.stderr.decode()
    rss = json.loads(res.stdout.decode().strip().splitlines()[-1])
    above = (rss["peak_kb"] - rss["baseline_kb"]) * 1024
    assert above < 3 * block_bytes, (
        f"{above / 2**20:.1f} MiB above baseline; one block is {block_bytes / 2**20:.1f} MiB"
    )
    assert (tmp_path / "out" / "model-block-00011.safetensors").exists()


def test_memory_estimate_follows_what_streaming_holds():
    """Streaming holds one block, never the whole model, and the embeddings or the head one at a time (both
    only while a quantized head exists in memory alone); in memory, everything."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.models import ModelAdapter
    from lowbit.pipeline.plan import check_plan, estimate

    # a vocabulary large next to the blocks, as in real LMs: embeddings and head are each bigger than a block
    config = LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    adapter = ModelAdapter(model)
    elem = 4
    block = sum(p.numel() for p in adapter.blocks[0].parameters()) * elem
    embed = model.get_input_embeddings().weight.numel() * elem
    head = model.lm_head.weight.numel() * elem
    assert min(embed, head) > block
    n_blocks = len(adapter)

    def peak(step, streaming):
        targeted = check_plan(adapter, [step], allow_nonfinite=False)
        return estimate(adapter, [step], targeted, torch.float32, 0, streaming=streaming).peak_memory_bytes

    rtn = RTN(format="int4", group_size=32)
    with_head = RTN(format="int4", group_size=32, ignore=[])
    streamed, in_memory = peak(rtn, True), peak(rtn, False)
    # RTN: no Hessian, a small working copy; the outside stage (one block + the larger of embeddings and head) wins
    assert in_memory - streamed >= (n_blocks - 1) * block + min(embed, head)
    assert peak(with_head, True) - streamed >= min(embed, head)  # the quantized head and the embeddings together


def test_allocator_is_set_up_before_the_skeleton_allocates(tiny_lm_dir, tmp_path, monkeypatch):
    """Building the skeleton allocates every parameter once and frees it. Under glibc's default (rising) mmap
    threshold that left the heap as large as the model, free but reused later and then kept resident (a 1.1B run
    grew by 1.2 GiB). So the threshold must be fixed before the skeleton exists, and the heap trimmed after."""
    from lowbit.models import lazy
    from lowbit.pipeline import directory, memory

    events = []
    real_init, real_fix, real_trim = lazy.LazyModel.__init__, memory.return_freed_memory_promptly, memory.trim

    def init(self, *args, **kwargs):
        events.append("skeleton")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(lazy.LazyModel, "__init__", init)
    for module in (directory, memory):
        monkeypatch.setattr(module, "return_freed_memory_promptly", lambda *a: events.append("fix") or real_fix(*a))
        monkeypatch.setattr(module, "trim", lambda: events.append("trim") or real_trim())
    opts = PipelineOptions(progress=False, sanity_samples=0, tune_allocator=True)
    quantize_checkpoint(tiny_lm_dir, [RTN(format="int4", group_size=32)], tmp_path / "out", options=opts)
    first_skeleton = events.index("skeleton")
    assert "fix" in events[:first_skeleton], events
    assert events[first_skeleton + 1] == "trim", events

    events.clear()  # the library leaves the process's allocator alone unless asked
    opts = PipelineOptions(progress=False, sanity_samples=0)
    quantize_checkpoint(tiny_lm_dir, [RTN(format="int4", group_size=32)], tmp_path / "out2", options=opts)
    assert "fix" not in events, events


@pytest.mark.parametrize("threshold,expected", [(1, True), (1 << 40, False)])
def test_the_cli_tunes_the_allocator_for_large_checkpoints_only(
    tiny_lm_dir, tmp_path, monkeypatch, threshold, expected
):
    from lowbit.cli import main, quantize_cmd
    from lowbit.pipeline import directory

    seen = []
    real = directory.quantize_directory
    monkeypatch.setattr(quantize_cmd, "TUNE_ALLOCATOR_FROM_BYTES", threshold)
    monkeypatch.setattr(
        directory, "quantize_directory", lambda *a, **k: seen.append(k["options"].tune_allocator) or real(*a, **k)
    )
    import lowbit.api

    monkeypatch.setattr(lowbit.api, "quantize_directory", directory.quantize_directory)
    assert main(["quantize", str(tiny_lm_dir), "--group-size", "32", "--out", str(tmp_path / "q"), "--json"]) == 0
    assert seen == [expected]


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "hqq", "awq+gptq"])
def test_every_cli_method_runs_on_a_float16_checkpoint(tmp_path, method):
    """Checkpoints stored in float16 (like the built-in reference-lm) stream through every method: calibration
    activations, scale searches and Hessians must follow the blocks' dtype, not assume float32."""
    from lowbit.cli import main

    model = save_tiny_lm(tmp_path / "m", dtype=torch.float16)
    out = tmp_path / "out"
    args = ["quantize", str(model), "--method", method, "--bits", "4", "--group-size", "32", "--out", str(out)]
    assert main([*args, "--n-samples", "8", "--seq-len", "64", "--sanity-samples", "2", "--force"]) == 0
    saved = _tensors(out)
    assert all(t.dtype == torch.float16 for t in saved.values() if t.is_floating_point())
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())


def test_an_unexpected_failure_inside_a_step_names_the_step_and_block(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    from lowbit.cli import main

    def broken(self, unit):
        raise RuntimeError("expected m1 and m2 to have the same dtype")

    monkeypatch.setattr(GPTQ, "apply", broken)
    args = ["quantize", str(tiny_lm_dir), "--method", "gptq", "--group-size", "32", "--out", str(tmp_path / "out")]
    assert main([*args, "--n-samples", "8", "--seq-len", "64"]) == 1
    err = capsys.readouterr().err
    assert "same dtype (in step 'gptq' on model.layers.0)" in " ".join(err.split())
    assert not (tmp_path / "out").exists()


def test_float16_checkpoints_compute_in_float32_on_the_cpu(tmp_path):
    from lowbit.models.dtypes import compute_dtype
    from lowbit.models.lazy import LazyModel

    assert compute_dtype(torch.float16, "cpu") == torch.float32  # no fast fp16 arithmetic on CPUs
    assert compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert compute_dtype(torch.float16, "cuda") == torch.float16
    model = save_tiny_lm(tmp_path / "m", dtype=torch.float16)
    lazy = LazyModel(model, device="cpu")  # as the pipeline builds it
    assert lazy.storage_dtype == torch.float16 and lazy.dtype == torch.float32
    # the dry run plans with the dtypes the run will use: float32 blocks, a float16 output
    plan = quantize_checkpoint(model, [RTN(format="int4", group_size=32)], tmp_path / "out", dry_run=True).plan
    assert "float16" not in " ".join(plan.notes)
    assert plan.checkpoint_bytes == sum(p.numel() for p in lazy.model.parameters()) * 2


def test_a_run_failing_before_any_block_finishes_leaves_nothing_behind(tmp_path, capsys):
    """NaN weights are found when their block is read; with no finished block there is nothing to resume, so
    neither the output nor its hidden progress directory remains."""
    from safetensors.torch import save_file

    from lowbit.cli import main

    model = save_tiny_lm(tmp_path / "m")
    shard = next(model.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(k for k in tensors if "layers.0.self_attn.q_proj" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["quantize", str(model), "--method", "gptq", "--group-size", "32", "--out", str(out)]) == 2
    assert "q_proj has 1 NaN/Inf weights" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
