"""GGUF export: the gguf package reads every tensor back to exactly lowbit's values; llama.cpp runs the file."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit.algorithms import GPTQ, RTN
from lowbit.api import quantize_checkpoint
from lowbit.export.layouts import ExportError
from lowbit.pipeline import PipelineOptions
from lowbit.runtime import PackedLinear
from tests.conftest import save_tiny_lm

gguf = pytest.importorskip("gguf")
OPTIONS = PipelineOptions(progress=False, sanity_samples=0)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order (a plain transcription: row 2i+s of a head came from row s*hd/2+i)."""
    rows = w.shape[0]
    hd = rows // heads
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(hd // 2):
            for s in range(2):
                out[h * hd + s * hd // 2 + i] = w[h * hd + 2 * i + s]
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_lm(
        tmp_path_factory.mktemp("m") / "tiny", hidden=256, intermediate=512, layers=2, dtype=torch.float16
    )


@pytest.mark.parametrize(
    "step,types",
    [
        (RTN(format="q4_k"), {"Q4_K"}),
        (GPTQ(format="q6_k"), {"Q6_K"}),
        (GPTQ(format="q3_k", static_groups=False, act_order=False), {"Q3_K"}),  # parameters per super-block
        (RTN(format="q5_1"), {"Q5_1"}),
        (GPTQ(format="int4", group_size=128), {"Q4_0"}),  # lowbit INT4 sym g128 holds in Q4_0 blocks
        (RTN(format="int8", group_size=-1), {"Q8_0"}),
    ],
)
def test_the_gguf_reader_gets_back_exactly_lowbits_values(model_dir, tmp_path, step, types):
    kw = dict(n_samples=8, seq_len=64, options=OPTIONS) if step.needs_calibration else dict(options=OPTIONS)
    run = quantize_checkpoint(model_dir, [step], tmp_path / "out", save_format="gguf", **kw)
    reader = gguf.GGUFReader(run.out_dir / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    loaded = lowbit.load(run.out_dir, dtype=torch.float32, native_kernels=False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    seen = set()
    for module_name, module in loaded.model.named_modules():
        if not isinstance(module, PackedLinear):
            continue
        t = tensors[f"{names.get_name(module_name)}.weight"]
        seen.add(t.tensor_type.name)
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(module.out_features, module.in_features)
        if module_name.endswith(("q_proj", "k_proj")):
            values = _unpermute(values, 4 if module_name.endswith("q_proj") else 2)
        np.testing.assert_array_equal(values, module.dense_weight().numpy(), err_msg=module_name)
    assert seen == types
    embed = tensors["token_embd.weight"]
    assert embed.tensor_type.name == "F16"  # the checkpoint's own float type
    np.testing.assert_array_equal(
        np.asarray(embed.data).reshape(-1, 256), loaded.model.model.embed_tokens.weight.detach().half().numpy()
    )
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == 4096


def test_formats_llama_cpp_cannot_hold_are_refused_before_any_work(model_dir, tmp_path):
    for step, message in (
        (RTN(format="int4", group_size=128, symmetric=False), "no llama.cpp type holds int4-asym-g128"),
        (RTN(format="nf4", group_size=64), "no llama.cpp type holds nf4"),
        (GPTQ(format="int4", group_size=64, static_groups=False), "static_groups"),
    ):
        with pytest.raises(ExportError, match=message):
            quantize_checkpoint(model_dir, [step], tmp_path / "x", save_format="gguf", options=OPTIONS, dry_run=True)
    assert not (tmp_path / "x").exists()


@pytest.mark.optional
def test_llama_cpp_runs_the_exported_file(tmp_path):
    """Needs llama.cpp's tools: LOWBIT_LLAMA_CPP=<dir with llama-perplexity>. The perplexity it computes on the
    held-out text matches lowbit's own on the same windows to the precision of its F16 arithmetic."""
    tools = os.environ.get("LOWBIT_LLAMA_CPP")
    if not tools:
        pytest.skip("set LOWBIT_LLAMA_CPP to llama.cpp's build/bin to run")
    run = quantize_checkpoint(
        "reference-lm",
        [GPTQ(format="q4_k")],
        tmp_path / "q",
        save_format="gguf",
        n_samples=32,
        seq_len=256,
        options=OPTIONS,
    )
    from lowbit.calibration import builtin_text_path

    res = subprocess.run(
        [str(Path(tools) / "llama-perplexity"), "-m", str(run.out_dir / "model.gguf"), "-f", str(builtin_text_path("heldout")),
         "-c", "256", "-b", "256", "--chunks", "20"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    final = [line for line in (res.stdout + res.stderr).splitlines() if "Final estimate" in line]
    assert final, res.stderr[-2000:]
    ppl = float(final[-1].split("PPL =")[1].split()[0])
    assert 30 < ppl < 120  # the reference model's perplexity on this text (second halves of 256-token windows)
