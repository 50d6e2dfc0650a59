"""The dry run's plan asks each step for its cost: a new method brings its own estimate (one file, no pipeline edit)."""

from typing import ClassVar

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.algorithms import GPTQ, RTN
from lowbit.algorithms.base import EstimateInputs, Step, StepEstimate, WeightQuantConfig
from lowbit.algorithms.hessian import hessian_nbytes
from lowbit.models import ModelAdapter
from lowbit.pipeline.plan import check_plan, estimate


class _Heavy(Step):
    """A made-up method that needs 3 GiB and a TFLOP: nothing in the pipeline knows its name."""

    name = "made-up-heavy"
    Config = WeightQuantConfig
    quantizes_weights = True
    seen: ClassVar[list[EstimateInputs]] = []

    def estimate(self, inputs: EstimateInputs) -> StepEstimate:
        self.seen.append(inputs)
        return StepEstimate(memory_bytes=3 * 2**30, block_passes=0.0, flops=1e12)


def _plan(steps, tokens=0):
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4
    )
    with torch.device("meta"):
        adapter = ModelAdapter(LlamaForCausalLM(config))
    targeted = check_plan(adapter, steps)
    return estimate(adapter, steps, targeted, torch.float32, tokens, streaming=True)


def test_a_new_step_brings_its_own_memory_and_time_estimate():
    base = _plan([RTN(format="int4", group_size=32)])
    heavy = _plan([_Heavy(format="int4", group_size=32)])
    assert heavy.peak_memory_bytes - base.peak_memory_bytes > 2.9 * 2**30
    assert heavy.seconds > base.seconds + 1e12 / 1e13  # a TFLOP takes well over 0.1 s at any CPU's rate
    inputs = _Heavy.seen[-1]
    assert len(inputs.layers) == 21 and inputs.layers["model.layers.0.mlp.down_proj"] == (64, 128)
    assert inputs.blocks == 3 and inputs.widest_input == 128


def test_gptq_states_its_hessian_and_passes():
    inputs = EstimateInputs(layers={"a": (64, 128), "b": (128, 64)}, block_params=1, blocks=1, calibration_tokens=10)
    cost = GPTQ(format="int4", group_size=32).estimate(inputs)
    assert cost.memory_bytes >= hessian_nbytes(128, "cpu")
    assert cost.block_passes > 0 and cost.flops >= 2 * 64 * 128**2 + 128**3
    # a GPTQ plan costs more time than RTN's on the same model and data
    assert (
        _plan([GPTQ(format="int4", group_size=32)], 4096).seconds
        > _plan([RTN(format="int4", group_size=32)], 4096).seconds
    )
