"""`lowbit quantize DIR` (the streaming path) on a tiny random checkpoint of every registered family.

Each family is saved as a model directory with a tokenizer, quantized by the streaming pipeline with RTN and with
GPTQ, and loaded back with transformers. The streamed checkpoint must hold exactly the tensors of the original (no
missing or extra keys), every linear the recipe targets must be quantized (including linears outside the blocks, such
as BERT's pooler), and it must equal what the in-memory pipeline computes on the same model (a different code path:
the whole model loaded, no skeleton, no shards).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

import lowbit
from lowbit.algorithms import GPTQ, RTN
from lowbit.api import quantize_checkpoint
from lowbit.models import ModelAdapter, registered_model_types, resolve_model_path
from lowbit.pipeline import PipelineOptions
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


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_streaming_quantize_of_every_family_loads_in_transformers(tmp_path, model_type, method):
    path, cls = _save(tmp_path, model_type)
    step = {"rtn": RTN, "gptq": GPTQ}[method](format="int4", group_size=32)
    options = PipelineOptions(progress=False, sanity_samples=2, sanity_generate=2)
    run = quantize_checkpoint(path, [step], tmp_path / "out", n_samples=6, seq_len=32, options=options)

    original, streamed = _tensors(path), _tensors(run.out_dir)
    assert set(streamed) == set(original)

    loaded = lowbit.load_model(path)
    expected = lowbit.quantize(loaded, [step], calibration="builtin", n_samples=6, seq_len=32, options=options)
    names = {layer.name for layer in run.report.layers}
    assert names == {layer.name for layer in expected.report.layers}
    adapter = ModelAdapter(loaded.model)
    outside = set(adapter.outside_linears()) - {"lm_head"}
    assert outside <= names  # e.g. BERT's pooler: quantized and written, not left on the meta device
    in_memory = {k: v.to(streamed[k].dtype) for k, v in loaded.model.state_dict().items() if k in streamed}
    for key, value in streamed.items():
        if key in in_memory:
            assert torch.equal(value, in_memory[key]), key

    reloaded, info = cls.from_pretrained(run.out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = loaded.model(input_ids=ids)
        theirs = reloaded.eval()(input_ids=ids)
    key = "logits" if "logits" in theirs else "last_hidden_state"
    torch.testing.assert_close(theirs[key], ours[key], atol=1e-4, rtol=1e-4)
