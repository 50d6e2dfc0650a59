"""Every recipe in recipes/ parses and runs on a tiny model, quantizing every block linear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import lowbit
from lowbit.recipe import Recipe
from tests.conftest import random_ids

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert RECIPES, "recipes/ is empty"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs(path):
    recipe = Recipe.from_yaml(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )  # widths that groups of 128 divide
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    res = lowbit.quantize(model, recipe, calibration=random_ids(8, 16), progress=False)
    assert len(res.report.layers) == 14  # 2 blocks x 7 linears
    acts = {step.activation_scheme for step in recipe.steps if step.activation_scheme is not None}
    if acts:
        assert all(r.activation_bits == next(iter(acts)).bits for r in res.report.layers)
