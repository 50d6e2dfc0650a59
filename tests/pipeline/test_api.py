import pytest
import torch

import lowbit
from lowbit.algorithms import GPTQ, RTN, StepConfigError
from lowbit.calibration import CalibrationError
from lowbit.formats import Quantizer, make_format
from lowbit.pipeline import NonFiniteError, PlanError
from lowbit.recipe import Recipe, RecipeError
from tests.conftest import build_family, random_ids


def test_rtn_through_the_api_quantizes_every_block_linear_and_reports():
    model = build_family("llama")
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    res = lowbit.quantize(model, RTN(format="int4", group_size=32, symmetric=False), keep_codes=True)
    names = [r.name for r in res.report.layers]
    assert len(names) == 14 and "lm_head" not in names
    q = Quantizer(make_format("int4", group_size=32, symmetric=False))
    for r in res.report.layers:
        w = dict(model.named_modules())[r.name].weight
        assert torch.equal(w, q.dequantize(q.quantize(original[r.name])))
        assert r.bits_per_weight == 4.0 + 32 / 32
        assert 0 < r.rel_weight_error < 0.2
    assert torch.equal(model.lm_head.weight, original["lm_head"])
    totals = res.report.to_dict()["totals"]
    assert totals["packed_size_bytes"] < totals["size_before_bytes"]
    assert set(res.quantized) == set(names)


def test_targets_and_ignore_patterns():
    model = build_family("llama")
    res = lowbit.quantize(model, RTN(format="int8", group_size=32, targets=["re:.*mlp\\..*"], ignore=["down_proj"]))
    assert sorted(r.name.split(".")[-1] for r in res.report.layers) == ["gate_proj", "gate_proj", "up_proj", "up_proj"]
    res = lowbit.quantize(build_family("llama"), RTN(format="int8", group_size=32, ignore=[]))
    assert "lm_head" in [r.name for r in res.report.layers]


def test_yaml_recipe_round_trip_and_validation():
    text = """
lowbit_recipe: 1
steps:
  - rtn:
      format: nf4
      ignore: [lm_head, "*.o_proj"]
  - gptq: {format: int3, group_size: 32, act_order: true}
"""
    recipe = Recipe.from_yaml(text)
    assert [s.name for s in recipe] == ["rtn", "gptq"]
    assert recipe.needs_calibration
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.to_dict() == recipe.to_dict()
    with pytest.raises(StepConfigError, match="gptq.*act_ordr"):
        Recipe.from_yaml("steps:\n  - gptq: {act_ordr: true}")
    with pytest.raises(StepConfigError, match="rtn.*group_size 48|group_size"):
        Recipe.from_yaml("steps:\n  - rtn: {group_size: -5}")
    with pytest.raises(ValueError, match="unknown step 'gptqq'"):
        Recipe.from_yaml("steps:\n  - gptqq: {}")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml("steps: [\n")
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_yaml("missing_recipe.yaml")


def test_plan_errors_come_before_any_work():
    with pytest.raises(PlanError, match="group_size 48 does not divide the input dimension 64"):
        lowbit.quantize(build_family("llama"), RTN(format="int4", group_size=48))
    with pytest.raises(PlanError, match="Embedding.*Linear and Conv1D"):
        lowbit.quantize(build_family("llama"), RTN(targets=["embed_tokens"]))
    with pytest.raises(PlanError, match="targets no Linear"):
        lowbit.quantize(build_family("llama"), RTN(targets=["re:nothing"]))
    with pytest.raises(CalibrationError, match="gptq.*need calibration"):
        lowbit.quantize(build_family("llama"), GPTQ(group_size=32))


def test_nonfinite_weights_name_the_layer_or_are_zeroed_on_request():
    model = build_family("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj has 1 NaN/Inf"):
        lowbit.quantize(model, RTN(format="int4", group_size=32))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before), "nothing may change on refusal"
    lowbit.quantize(model, RTN(format="int4", group_size=32), allow_nonfinite=True)
    assert torch.isfinite(model.model.layers[1].mlp.up_proj.weight).all()


def test_gptq_pipeline_is_deterministic_and_sequential_order_matters():
    ids = random_ids(8, 32)
    results = []
    for propagate in ("quantized", "quantized", "fp"):
        model = build_family("llama")
        lowbit.quantize(model, GPTQ(format="int3", group_size=32), calibration=ids, propagate=propagate)
        results.append(model.model.layers[1].mlp.down_proj.weight.clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_gptq_beats_rtn_end_to_end():
    ids = random_ids(16, 32, seed=3)
    ref = build_family("llama")
    outs = {}
    for step in (RTN(format="int3", group_size=32), GPTQ(format="int3", group_size=32)):
        model = build_family("llama")
        res = lowbit.quantize(model, step, calibration=ids)
        outs[step.name] = (model(input_ids=ids).logits - ref(input_ids=ids).logits).pow(2).mean()
        if step.name == "gptq":
            assert all(r.output_error <= r.output_error_rtn + 1e-9 for r in res.report.layers)
    assert outs["gptq"] < outs["rtn"]


def test_text_calibration_uses_the_tokenizer(tmp_path):
    res = lowbit.quantize(
        "reference-lm",
        GPTQ(format="int4", targets=["re:model\\.layers\\.0\\..*"]),
        calibration="builtin",
        n_samples=4,
        seq_len=64,
    )
    assert len(res.report.layers) == 7
    assert "4 x 64 tokens" in res.report.extra["calibration"]


def test_nan_activations_name_the_block():
    model = build_family("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1 produced NaN/Inf activations"):
        lowbit.quantize(model, GPTQ(format="int4", group_size=32), calibration=random_ids(4, 16))


def test_calibration_from_a_hugging_face_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    from lowbit.calibration import from_hf_dataset
    from lowbit.models import resolve_model_path

    rows = {"text": ["Friends, Romans, countrymen, lend me your ears. " * 20] * 5}
    calls = {}

    def fake_load(name, config_name=None, split=None):
        calls.update(name=name, split=split)
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("reference-lm"))
    data = from_hf_dataset("some/corpus", tok, split="validation", n_samples=3, seq_len=32, seed=1)
    assert calls == {"name": "some/corpus", "split": "validation"}
    assert data.input_ids.shape == (3, 32)
    with pytest.raises(CalibrationError, match="no field 'content'"):
        from_hf_dataset("some/corpus", tok, text_field="content", n_samples=3, seq_len=32)


def test_the_library_has_no_side_effects_on_the_callers_process():
    """``import lowbit`` leaves the environment alone, and ``lowbit.quantize`` neither reads nor resets torch's
    global random state (its results depend on ``seed`` only)."""
    import os
    import subprocess
    import sys

    code = "import os, lowbit, lowbit.algorithms; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout.strip() == "None", res.stderr

    ids = random_ids(8, 16, seed=3)

    def run(seed):
        model = build_family("llama")
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        lowbit.quantize(model, GPTQ(format="int4", group_size=32), calibration=ids, progress=False)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's stream continues where it was
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b = run(0), run(12345)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_report_says_where_the_time_went():
    ids = random_ids(8, 16, seed=4)
    res = lowbit.quantize(build_family("llama"), [GPTQ(format="int4", group_size=32)], calibration=ids, progress=False)
    timings = res.report.timings
    assert {"capture", "gptq"} <= set(timings)
    assert all(v["wall_s"] >= 0 and v["cpu_s"] >= 0 for v in timings.values())
    assert sum(v["wall_s"] for v in timings.values()) <= res.report.seconds
    assert res.report.to_dict()["timings"] == timings
