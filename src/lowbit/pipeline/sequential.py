"""The sequential pipeline: calibrate and quantize one transformer block at a time.

Order (as in GPTQ and llm-compressor): capture the inputs of the first block, then for each
block run every recipe step on it and feed the block's outputs (by default those of the
*quantized* block) to the next. Only the block being worked on needs to sit on the compute
device; the rest of the model stays where it is.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..algorithms.base import Step, TransformContext
from ..calibration import CalibrationData, CalibrationError
from ..formats.activations import attach_input_quantizer
from ..models import ModelAdapter
from ..models.loading import model_kind
from .capture import capture_first_block_inputs
from .generation import generate_with_store, logits_of
from .memory import return_freed_memory_promptly, trim
from .options import PipelineOptions
from .plan import NonFiniteError, check_finite_weights, check_plan, mark_followers, rounding_steps
from .progress import ProgressReporter
from .resume import RunDirectory
from .sanity import SanityReport, SanityTracker, final_report
from .store import InMemoryStore
from .tensors import computing_in, first_tensor
from .timing import CAPTURE, LOAD, SANITY, WRITE, PhaseTimes
from .unit import QuantState, StopForward, Unit

log = logging.getLogger(__name__)


def _block_forward(block: nn.Module):
    def forward(h: torch.Tensor, a: tuple, kw: dict) -> torch.Tensor:
        return first_tensor(block(h, *a, **kw))

    return forward


def _head_forward(norm: nn.Module | None, head: nn.Module | None):
    """The head unit's forward on the last block's outputs (``None`` when nothing runs after the blocks)."""
    if head is None:
        return None
    logits = logits_of(norm, head)
    return lambda h, a, kw: logits(h)


@dataclass
class PipelineResult:
    state: QuantState
    sanity: SanityReport | None = None
    timings: PhaseTimes = field(default_factory=PhaseTimes)
    #: entries the saved config.json needs (a model transform's online rotations, an untied head)
    config_updates: dict = field(default_factory=dict)


def run_pipeline(
    model: nn.Module,
    steps: Sequence[Step],
    calibration: CalibrationData | None = None,
    options: PipelineOptions | None = None,
    *,
    held_back: CalibrationData | None = None,
    store: InMemoryStore | None = None,
    run_dir: RunDirectory | None = None,
    timings: PhaseTimes | None = None,
) -> PipelineResult:
    """Apply ``steps`` to ``model`` block by block (in place, or streamed through ``store``).

    ``held_back`` samples (not used for calibration) feed the sanity check; ``run_dir`` records
    progress after every block so that an interrupted run resumes where it stopped; ``timings``
    collects the wall and CPU time of each phase.
    """
    options = options or PipelineOptions()
    store = store or InMemoryStore()
    timings = timings if timings is not None else PhaseTimes()
    phase = timings.phase
    if store.streaming and options.tune_allocator:
        return_freed_memory_promptly()
    adapter = ModelAdapter(model)
    adapter.unfuse_experts()
    targeted = check_plan(adapter, steps, options.allow_nonfinite)
    mark_followers(steps, list(targeted))
    context = TransformContext(
        calibration=calibration,
        batch_size=options.batch_size,
        device=str(options.resolved_device()),
        load_model=lambda: store.load_all(adapter),
        release_model=lambda: store.release_all(adapter),
    )
    transform = model_transform(steps, adapter, context)
    needs_data = [s.name for s in steps if s.needs_calibration]
    if needs_data and calibration is None:
        raise CalibrationError(f"step(s) {', '.join(needs_data)} need calibration data; pass calibration=...")
    # A packing store writes each block's codes (and drops them) as the block is done.
    state = QuantState(keep_codes=(options.keep_codes and not store.streaming) or store.keeps_codes)
    device = options.resolved_device()
    check_sanity = (
        held_back is not None and model_kind(model.config) == "causal-lm" and adapter.lm_head()[1] is not None
    )
    inputs = sanity = None
    resume = run_dir.load() if run_dir is not None else None
    generate = check_sanity and options.sanity_generate > 0
    if needs_data or check_sanity:
        with phase(LOAD):
            store.load_outside(adapter)
        with phase(CAPTURE):
            inputs = capture_first_block_inputs(model, adapter, calibration, options) if needs_data else None
        if check_sanity:
            with phase(SANITY):
                sanity = SanityTracker(capture_first_block_inputs(model, adapter, held_back, options))
        store.release_outside(adapter)
        log.debug("first-block inputs captured")
        if generate and resume is None:
            with phase(SANITY):
                sanity.generated_reference, _ = generate_with_store(
                    model, adapter, held_back, options, store, output=False
                )
            log.info("original model's greedy continuation: %s", sanity.generated_reference)
    if transform is not None:
        # From here on the model is the transformed one: the outside weights change where they are
        # held (or as they are read and written), and the activations captured from the original
        # embeddings become what the transformed embeddings produce.
        store.set_transform(adapter, transform)
        if inputs is not None:
            inputs = inputs.with_hidden([transform.rotate_hidden(h) for h in inputs.hidden])
        if sanity is not None:
            sanity.transform(transform.rotate_hidden)
    start_block = 0
    if resume is not None:
        start_block = resume.next_block
        state.results.update(resume.results)
        state.tokens_per_expert.update(resume.tokens_per_expert)
        if inputs is not None:
            inputs = inputs.with_hidden(resume.activations["hidden"])
        if transform is not None:
            for index in range(start_block):
                transform.attach_online(index)
        if sanity is not None:
            sanity.restore(resume.activations)
            _reattach_input_quantizers(adapter, steps, state, store, start_block)
    if inputs is not None:
        log.info("calibration: %d batches, %d tokens into block %d", len(inputs), inputs.tokens(), start_block)

    head_linears = {n: m for n, m in adapter.outside_linears().items() if n in targeted}
    to_quantize = [n for n in targeted if any(s.quantizes_weights and s.config.selects(n) for s in steps)]
    with ProgressReporter(options.progress, total=len(to_quantize), description="quantizing layers") as progress:
        progress.skip(sum(1 for n in to_quantize if n in state.results))
        state.on_commit = lambda result: progress.advance(result.name)
        for index in range(start_block, len(adapter)):
            name = adapter.block_name(index)
            started = time.perf_counter()
            with phase(LOAD):
                store.load_block(adapter, index)
                log.debug("%s loaded", name)
                check_finite_weights(
                    {n: m for n, m in adapter.block_linears(index).items() if n in targeted}, options.allow_nonfinite
                )
            block = adapter.blocks[index]
            home = next(block.parameters()).device
            block.to(device)
            if transform is not None:
                with phase(steps[0].name):
                    transform.rotate_block(index)
            arithmetic = options.arithmetic_dtype(_floating_dtype(block), device)
            with computing_in([block], arithmetic):
                unit = Unit(
                    name=name,
                    index=index,
                    module=block,
                    linears=adapter.block_linears(index),
                    groups=adapter.groups(index),
                    state=state,
                    inputs=inputs,
                    forward=_block_forward(block),
                    device=device,
                    norm_offset=adapter.arch.norm_offset,
                    compute_dtype=arithmetic,
                )
                experts = adapter.experts(index)
                routing_key = f"{name}.{adapter.arch.moe.path}" if experts is not None else ""
                outputs = _quantize_block(
                    unit, steps, options, sanity, experts, routing_key, state, phase, progress, len(adapter)
                )
            if outputs is not None:
                inputs = inputs.with_hidden(outputs)
            block.to(home)
            del unit  # it holds this block's inputs: let them go before the next block loads
            with phase(WRITE):
                store.finish_block(adapter, index, state.quantized)
                trim()
                if run_dir is not None:
                    activations = {"hidden": inputs.hidden} if inputs is not None else {}
                    if sanity is not None:
                        activations.update(sanity.state())
                    run_dir.save(index + 1, activations, state.results, state.tokens_per_expert)
            log.info("%s done in %.2fs", name, time.perf_counter() - started)

        if head_linears or sanity is not None:
            with phase(LOAD):
                store.load_head(adapter, head_linears)
        _, norm = adapter.final_norm()
        _, head = adapter.lm_head()
        if head_linears:
            forward = _head_forward(norm, head or adapter.pooler()[1])
            unit = Unit(
                name="",
                index=len(adapter),
                module=model,
                linears=head_linears,
                groups=[],
                state=state,
                inputs=inputs if forward is not None else None,
                forward=forward or _no_forward,
                device=device,
            )
            for step in steps:
                progress.update(f"head: {step.name}")
                with phase(step.name):
                    step.apply(unit)
                    step.quantize_inputs(unit)
            del unit
        inputs = None  # the calibration activations are done with; the final stage needs the memory
    state.on_commit = None
    for step in steps:
        step.finish()
    report = None
    if sanity is not None:
        with phase(SANITY):
            report = final_report(model, adapter, sanity, held_back, options, store, generate, bool(head_linears))
    if not head_linears:
        store.release_outside(adapter)  # the writer reads them from disk in turn
    with phase(WRITE):
        store.finish(adapter, state.quantized)
    updates = transform.config_updates() if transform is not None else {}
    if updates.get("lowbit_online_rotations"):
        log.warning(
            "the model rotates some layers' inputs at run time (online Hadamard); lowbit.load, lowbit eval and "
            "lowbit generate apply it, transformers and vLLM do not: for their checkpoints use online: false"
        )
    return PipelineResult(state, report, timings, updates)


def model_transform(steps: Sequence[Step], adapter: ModelAdapter, context: TransformContext | None = None):
    """The recipe's whole-model transform (at most one step makes one), checked against the model."""
    context = context or TransformContext()
    rotating = [s for s in steps if type(s).model_transform is not Step.model_transform]
    if len(rotating) > 1:
        raise ValueError(f"a recipe can rotate the model once; steps {[s.name for s in rotating]} each do")
    if rotating and steps[0] is not rotating[0]:
        raise ValueError(f"step {rotating[0].name!r} transforms the whole model and must come first in the recipe")
    return rotating[0].model_transform(adapter, context) if rotating else None


def _quantize_block(
    unit: Unit,
    steps: Sequence[Step],
    options: PipelineOptions,
    sanity: SanityTracker | None,
    experts,
    routing_key: str,
    state: QuantState,
    phase,
    progress: ProgressReporter,
    blocks: int,
) -> list[torch.Tensor] | None:
    """Every step on one block; returns the block's outputs for the next one (``None`` without
    calibration data). The sanity samples go through the block before and after."""
    if experts is not None:
        experts.route_all = options.moe_route_all
    try:
        if sanity is not None:
            with phase(SANITY):
                sanity.before(unit)
        with phase(CAPTURE), _count_routing(experts, state, routing_key):
            fp_outputs = unit.run() if unit.inputs is not None and options.propagate == "fp" else None
        for step in steps:
            progress.update(f"block {unit.index + 1}/{blocks}: {step.name}")
            try:
                with phase(step.name):
                    step.apply(unit)
                    step.quantize_inputs(unit)
            except Exception as exc:  # the type stays; the message gains where it happened
                exc.add_note(f"in step '{step.name}' on {unit.name}")
                raise
        outputs = fp_outputs
        if unit.inputs is not None:
            if outputs is None:
                with phase(CAPTURE), _count_routing(experts, state, routing_key):
                    outputs = unit.run()
            _check_activations(outputs, unit.name)
    finally:
        if experts is not None:
            experts.route_all = False
    if sanity is not None:
        with phase(SANITY):
            sanity.after(unit)
    return outputs


def _reattach_input_quantizers(adapter: ModelAdapter, steps: Sequence[Step], state: QuantState, store, blocks: int):
    """On a resumed run, the blocks finished before the interruption quantize their inputs again (the
    final sanity check runs them as saved): dynamic schemes as the recipe says, static ones with
    the scale their shard holds."""
    for index in range(blocks):
        linears = adapter.block_linears(index)
        rounding = rounding_steps(steps, list(linears))
        schemes = {}
        for name in linears:
            result = state.results.get(name)
            scheme = rounding[name].activation_scheme if name in rounding else None
            if result is not None and result.activations is not None and scheme is not None:
                schemes[name] = scheme
        static = [f"{name}.input_scale" for name, scheme in schemes.items() if not scheme.dynamic]
        scales = store.saved_tensors(index, static) if static else {}
        for name, scheme in schemes.items():
            attach_input_quantizer(linears[name], scheme, scales.get(f"{name}.input_scale"))


def _floating_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def _count_routing(experts, state: QuantState, key: str):
    """Count the tokens routed to each expert during one full pass over the calibration data."""
    if experts is None:
        yield
        return
    experts.tokens_seen.zero_()
    experts.counting = True
    try:
        yield
    finally:
        experts.counting = False
    if int(experts.tokens_seen.sum()) > 0:
        state.tokens_per_expert[key] = experts.tokens_seen.tolist()


def _no_forward(h, a, kw):
    raise StopForward


def _check_activations(outputs: list[torch.Tensor], block: str) -> None:
    for out in outputs:
        if not torch.isfinite(out).all():
            raise NonFiniteError(
                f"{block} produced NaN/Inf activations on the calibration data; the block (or its quantization) "
                "is numerically broken"
            )
