"""`lowbit quantize DIR` (the streaming path) on a tiny random checkpoint of every registered family.

Each family is saved as a model directory with a tokenizer, quantized by the streaming pipeline with RTN and with
GPTQ into the default packed checkpoint, and loaded back. Every linear the recipe targets must be quantized
(including linears outside the blocks, such as BERT's pooler), and the checkpoint must hold exactly what the
in-memory pipeline computes on the same model (a different code path: the whole model loaded, no skeleton, no
shards): read back by lowbit, and by transformers wherever it is compressed-tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import lowbit
from lowbit.algorithms import GPTQ, RTN
from lowbit.api import quantize_checkpoint
from lowbit.models import ModelAdapter, registered_model_types, resolve_model_path, weight_of
from lowbit.pipeline import PipelineOptions
from lowbit.runtime import PackedLinear
from tests.conftest import FAMILY_CONFIGS
from tests.models.test_moe import MOE

VOCAB = 4096  # the reference tokenizer's


def _config(model_type: str):
    if model_type in FAMILY_CONFIGS:
        config = FAMILY_CONFIGS[model_type]()
    else:
        config = MOE[model_type]()
    config.vocab_size = VOCAB
    return config


FAMILIES = sorted(set(FAMILY_CONFIGS) | set(MOE))


def test_every_registered_family_is_covered():
    assert set(registered_model_types()) == set(FAMILIES)


def _save(tmp_path, model_type: str):
    torch.manual_seed(0)
    config = _config(model_type)
    cls = transformers.AutoModel if model_type == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(config).eval()
    path = tmp_path / model_type
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(resolve_model_path("reference-lm")).save_pretrained(path)
    return path, cls


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_streaming_quantize_of_every_family_loads_in_transformers(tmp_path, model_type, method):
    path, cls = _save(tmp_path, model_type)
    step = {"rtn": RTN, "gptq": GPTQ}[method](format="int4", group_size=32)
    options = PipelineOptions(progress=False, sanity_samples=2, sanity_generate=2)
    run = quantize_checkpoint(path, [step], tmp_path / "out", n_samples=6, seq_len=32, options=options)

    loaded = lowbit.load_model(path)
    expected = lowbit.quantize(loaded, [step], calibration="builtin", n_samples=6, seq_len=32, options=options)
    names = {layer.name for layer in run.report.layers}
    assert names == {layer.name for layer in expected.report.layers}
    outside = set(ModelAdapter(loaded.model).outside_linears()) - {"lm_head"}
    assert outside <= names  # e.g. BERT's pooler: quantized and written, not left on the meta device

    # The packed checkpoint holds exactly the in-memory result: read back by lowbit, dequantized exactly ...
    ours = lowbit.load(run.out_dir, dtype=torch.float32, native_kernels=False).model
    ModelAdapter(loaded.model).unfuse_experts()  # per-expert linears (views), as the checkpoint stores them
    for name, module in ours.named_modules():
        if isinstance(module, PackedLinear):
            want = weight_of(loaded.model.get_submodule(name))
            torch.testing.assert_close(module.dense_weight(), want, rtol=0, atol=0, msg=name)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = loaded.model(input_ids=ids)
        key = "logits" if "logits" in want else "last_hidden_state"
        torch.testing.assert_close(ours(input_ids=ids)[key], want[key], atol=1e-4, rtol=1e-4)

    # ... and, where it is compressed-tensors (not GPT-2's Conv1D), by transformers itself.
    config = json.loads((run.out_dir / "config.json").read_text())["quantization_config"]
    if config["quant_method"] == "compressed-tensors":
        theirs, info = cls.from_pretrained(
            run.out_dir,
            output_loading_info=True,
            quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            torch.testing.assert_close(theirs.eval()(input_ids=ids)[key], want[key], atol=1e-4, rtol=1e-4)
    else:
        assert model_type == "gpt2" and config["quant_method"] == "lowbit"
