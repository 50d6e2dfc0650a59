"""End to end on the real built-in models: the CLI's streaming path, then evaluation against the original.

Slow (minutes on 2 cores): ``python -m pytest -m slow``. The assertions are properties the methods must have on
any trained model (a calibrated method beats round-to-nearest at 3 bits), not numbers of one run.
"""

import pytest

from lowbit.algorithms import AWQ, GPTQ, RTN
from lowbit.api import quantize_checkpoint
from lowbit.eval import embedding_fidelity, evaluate_language, tokenize_text
from lowbit.models import load_model
from lowbit.pipeline import PipelineOptions

pytestmark = pytest.mark.slow

FORMAT = dict(format="int3", group_size=128, symmetric=False)


@pytest.fixture(scope="module")
def reference_lm():
    original = load_model("reference-lm")
    return original, tokenize_text(original.tokenizer, max_tokens=20000)


def _kl(tmp_path, name, recipe, original, ids):
    options = PipelineOptions(progress=False)
    run = quantize_checkpoint("reference-lm", recipe, tmp_path / name, n_samples=64, seq_len=256, options=options)
    assert run.sanity is not None and run.sanity.passed
    quantized = load_model(run.out_dir)
    return evaluate_language(quantized.model, ids, reference=original.model).kl


def test_calibrated_methods_beat_rtn_on_reference_lm(tmp_path, reference_lm):
    original, ids = reference_lm
    rtn = _kl(tmp_path, "rtn", [RTN(**FORMAT)], original, ids)
    gptq = _kl(tmp_path, "gptq", [GPTQ(**FORMAT)], original, ids)
    awq = _kl(tmp_path, "awq", [AWQ(**FORMAT)], original, ids)
    both = _kl(tmp_path, "awq-gptq", [AWQ(**FORMAT), GPTQ(**FORMAT)], original, ids)
    assert gptq < 0.75 * rtn, (gptq, rtn)
    assert awq < rtn, (awq, rtn)
    assert both < rtn, (both, rtn)


def test_gptq_keeps_minilm_embeddings_closer_than_rtn(tmp_path):
    original = load_model("minilm")
    options = PipelineOptions(progress=False)
    cosines = {}
    for name, step in (("rtn", RTN(**FORMAT)), ("gptq", GPTQ(**FORMAT))):
        run = quantize_checkpoint("minilm", [step], tmp_path / name, n_samples=32, seq_len=128, options=options)
        quantized = load_model(run.out_dir)
        cosines[name] = embedding_fidelity(quantized.model, original.model, original.tokenizer).cosine_mean
    assert cosines["gptq"] > cosines["rtn"], cosines
