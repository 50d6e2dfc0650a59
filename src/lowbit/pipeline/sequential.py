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
from typing import Literal

import torch
from torch import nn

from ..algorithms.base import Step
from ..calibration import CalibrationData, CalibrationError
from ..models import ModelAdapter
from ..models.loading import model_kind
from .generation import OutsideLoader, greedy_continuation
from .memory import return_freed_memory_promptly, trim
from .plan import NonFiniteError, check_finite_weights, check_plan, mark_followers
from .progress import ProgressReporter
from .resume import RunDirectory
from .sanity import SanityReport, SanityThresholds, SanityTracker
from .store import InMemoryStore
from .tensors import first_tensor, to_device
from .timing import CAPTURE, LOAD, SANITY, WRITE, PhaseTimes
from .unit import BlockInputs, QuantState, StopForward, Unit

log = logging.getLogger(__name__)


@dataclass
class PipelineOptions:
    """How the pipeline runs.

    Attributes:
        device: where each block is processed (default: CUDA when available, else CPU).
        batch_size: calibration sequences per forward pass.
        propagate: feed the next block the ``quantized`` block's outputs (GPTQ's order) or the
            full-precision (``fp``) ones.
        keep_codes: keep the integer codes and scales of every layer in ``result.quantized`` (for
            export); off by default, because one uint8 code per weight is half the size of a
            bf16 model.
        allow_nonfinite: replace NaN/Inf weights by 0 (with a warning) instead of refusing.
        progress: show progress bars.
        sanity_samples: calibration samples held back to compare the quantized model with the
            original before saving (causal LMs; 0 turns the check off).
        sanity: thresholds of that check.
        sanity_generate: new tokens of the check's greedy generation (0: none). Each costs one
            pass over the weights of both models (read again from disk in streaming runs).
        moe_route_all: during calibration, run every token through every expert of MoE blocks
            (their outputs still combine only the routed experts), so that every expert gets
            statistics.
        tune_allocator: in streaming runs, make glibc return freed memory to the system at once
            (:mod:`.memory`). It changes the process's allocator for good (glibc cannot restore
            its adaptive default), so it is off in the library; the CLI turns it on for
            checkpoints of 1 GiB and more, where it lowers the peak (1.1B GPTQ: 1.7 to 0.7 GiB).
            On small models it only costs time: reference-lm GPTQ 19 s without, 27 s with.
    """

    device: str | None = None
    batch_size: int = 8
    propagate: Literal["quantized", "fp"] = "quantized"
    keep_codes: bool = False
    allow_nonfinite: bool = False
    progress: bool = True
    sanity_samples: int = 4
    sanity: SanityThresholds = field(default_factory=SanityThresholds)
    sanity_generate: int = 8
    moe_route_all: bool = False
    tune_allocator: bool = False

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _CaptureDone(Exception):
    pass


@torch.no_grad()
def capture_first_block_inputs(
    model: nn.Module, adapter: ModelAdapter, calibration: CalibrationData, options: PipelineOptions
) -> BlockInputs:
    """Run the model up to the first block for every calibration batch; keep that block's inputs."""
    device = options.resolved_device()
    first = adapter.blocks[0]
    hidden, args, kwargs = [], [], []

    def hook(_mod, a, kw):
        kw = dict(kw)
        h = a[0] if a else kw.pop("hidden_states")
        hidden.append(h.detach().to("cpu"))
        args.append(to_device(tuple(a[1:]), "cpu"))
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        kwargs.append(to_device(kw, "cpu"))
        raise _CaptureDone

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    moved = _move_outside_blocks(model, adapter, device)
    try:
        for batch in calibration.batches(options.batch_size):
            batch = to_device(batch, device)
            try:
                try:
                    model(**batch, use_cache=False)
                except TypeError:
                    model(**batch)
            except _CaptureDone:
                pass
    finally:
        handle.remove()
        _move_back(moved)
    if not hidden:
        raise CalibrationError("calibration produced no inputs for the first block")
    return BlockInputs(hidden, args, kwargs)


def _move_outside_blocks(model: nn.Module, adapter: ModelAdapter, device: torch.device) -> list:
    moved = []
    prefix = adapter.blocks_path + "."
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(prefix) and t.device != device and t.device.type != "meta":
            moved.append((t, t.data))
            t.data = t.data.to(device)
    return moved


def _move_back(moved: list) -> None:
    for t, data in moved:
        t.data = data


def _block_forward(block: nn.Module):
    def forward(h: torch.Tensor, a: tuple, kw: dict) -> torch.Tensor:
        return first_tensor(block(h, *a, **kw))

    return forward


def _head_forward(norm: nn.Module | None, head: nn.Module | None):
    """The head unit's forward on the last block's outputs (``None`` when nothing runs after the blocks)."""
    if head is None:
        return None
    logits = _logits(norm, head)
    return lambda h, a, kw: logits(h)


def _logits(norm: nn.Module | None, head: nn.Module):
    return lambda h: head(norm(h) if norm is not None else h)


@dataclass
class PipelineResult:
    state: QuantState
    sanity: SanityReport | None = None
    timings: PhaseTimes = field(default_factory=PhaseTimes)


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
                sanity.generated_reference, _ = _generate(model, adapter, held_back, options, store, output=False)
            log.info("original model's greedy continuation: %s", sanity.generated_reference)
    start_block = 0
    if resume is not None:
        start_block = resume.next_block
        state.results.update(resume.results)
        state.tokens_per_expert.update(resume.tokens_per_expert)
        if inputs is not None:
            inputs = inputs.with_hidden(resume.activations["hidden"])
        if sanity is not None:
            sanity.restore(resume.activations)
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
            )
            experts = adapter.experts(index)
            if experts is not None:
                experts.route_all = options.moe_route_all
            if sanity is not None:
                with phase(SANITY):
                    sanity.before(unit)
            routing_key = f"{name}.{adapter.arch.moe.path}" if experts is not None else ""
            with phase(CAPTURE), _count_routing(experts, state, routing_key):
                fp_outputs = unit.run() if inputs is not None and options.propagate == "fp" else None
            for step in steps:
                progress.update(f"block {index + 1}/{len(adapter)}: {step.name}")
                try:
                    with phase(step.name):
                        step.apply(unit)
                except Exception as exc:  # the type stays; the message gains where it happened
                    exc.add_note(f"in step '{step.name}' on {name}")
                    raise
            if inputs is not None:
                if fp_outputs is None:
                    with phase(CAPTURE), _count_routing(experts, state, routing_key):
                        outputs = unit.run()
                else:
                    outputs = fp_outputs
                _check_activations(outputs, name)
                inputs = inputs.with_hidden(outputs)
            if experts is not None:
                experts.route_all = False
            if sanity is not None:
                with phase(SANITY):
                    sanity.after(unit)
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
            del unit
        inputs = None  # the calibration activations are done with; the final stage needs the memory
    state.on_commit = None
    for step in steps:
        step.finish()
    report = None
    if sanity is not None:
        with phase(SANITY):
            report = _final_sanity(model, adapter, sanity, held_back, options, store, generate, bool(head_linears))
    if not head_linears:
        store.release_outside(adapter)  # the writer reads them from disk in turn
    with phase(WRITE):
        store.finish(adapter, state.quantized)
    return PipelineResult(state, report, timings)


def _final_sanity(
    model, adapter, sanity: SanityTracker, held_back, options: PipelineOptions, store, generate: bool, keep_head: bool
) -> SanityReport:
    """Compare the quantized model with the original on the held-back samples, and continue the
    prompt greedily with the quantized model (``keep_head``: a quantized head exists only in memory)."""
    generated, nonfinite = None, False
    if generate and sanity.generated_reference is not None:
        # A quantized head stays in memory, and the embeddings join it.
        if keep_head:
            store.load_outside(adapter)
        else:
            store.release_outside(adapter)
        generated, nonfinite = _generate(
            model, adapter, held_back, options, store, output=True, swap_outside=not keep_head
        )
        log.info("quantized model's greedy continuation: %s", generated)
        store.load_head(adapter)
    prompt = _prompt(held_back).tolist() if generated is not None else None
    _, norm = adapter.final_norm()
    _, head = adapter.lm_head()
    return sanity.report(_logits(norm, head), options.sanity, generated, nonfinite, prompt)


def _prompt(held_back: CalibrationData) -> torch.Tensor:
    return held_back.input_ids[0, : min(16, held_back.seq_len)]


def _generate(
    model, adapter, held_back: CalibrationData, options: PipelineOptions, store, output: bool, swap_outside=True
):
    """Greedy continuation of the start of the first held-back sample, blocks loaded in turn
    (the finished ones from the output when ``output``); with ``swap_outside``, the embeddings
    and the head too (a no-op for a model in memory)."""
    _, norm = adapter.final_norm()
    _, head = adapter.lm_head()
    head_device = next(head.parameters()).device
    outside = None
    if swap_outside:
        outside = OutsideLoader(
            load_embeddings=lambda: store.load_outside(adapter),
            load_head=lambda: store.load_head(adapter),
            release=lambda: store.release_outside(adapter),
        )
        if head_device.type == "meta":  # released now; the store loads weights onto the CPU
            head_device = torch.device("cpu")
    return greedy_continuation(
        model,
        adapter,
        _prompt(held_back),
        options.sanity_generate,
        options,
        _logits(norm, head),
        load_block=lambda i: (store.load_output_block if output else store.load_block)(adapter, i),
        release_block=lambda i: store.release_block(adapter, i),
        head_device=head_device,
        outside=outside,
    )


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
