"""Recipe steps: a validated config plus ``apply(unit)``, and the registry that names them.

A step works on one :class:`~lowbit.pipeline.unit.Unit` at a time (a transformer block, or the
model's head). Transform steps change weights without quantizing them (scales, rotations);
quantizer steps choose codes and commit them with :meth:`Unit.commit`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator
from torch import nn

from ..formats import FormatSpec, make_format
from ..formats.activations import ActivationScheme, StaticObserver, attach_input_quantizer

if TYPE_CHECKING:
    from ..pipeline.unit import Unit


class StepConfig(BaseModel):
    """Options every step has.

    Attributes:
        targets: layers to work on, as full module names, globs (``*mlp*``) or regular
            expressions prefixed with ``re:``; a bare name also matches as a dotted suffix
            (``q_proj`` matches ``model.layers.0.self_attn.q_proj``).
        ignore: layers to leave alone, same syntax. The output projection is skipped by default.
    """

    model_config = ConfigDict(extra="forbid")

    targets: list[str] = ["*"]
    ignore: list[str] = ["lm_head"]

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("targets", "ignore")
    @classmethod
    def _check_patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return v

    def selects(self, name: str) -> bool:
        return any(match_name(name, p) for p in self.targets) and not any(match_name(name, p) for p in self.ignore)


def match_name(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


class WeightQuantConfig(StepConfig):
    """Options of a step that quantizes weights.

    Attributes:
        format: a format name (``int4``, ``nf4``, ``fp4``, ``mxfp4``, ``nvfp4`` ...; see
            ``lowbit.formats.format_names()``) or a full format spec as a mapping.
        bits, group_size, symmetric, clip: overrides of the format's fields (``group_size=-1``:
            per output channel).
        input_activations: quantize the inputs of these layers too when the model runs (W8A8, W4A8,
            W4A4 ...): an :class:`~lowbit.formats.activations.ActivationScheme` such as
            ``{format: int8, dynamic: true}``. Static schemes are calibrated on the calibration data.
    """

    format: str | FormatSpec = "int4"
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    clip: str | None = None
    input_activations: ActivationScheme | None = None
    _spec: FormatSpec | None = PrivateAttr(default=None)

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return make_format(v)
        return v

    def model_post_init(self, __context: Any) -> None:
        self._spec = make_format(
            self.format, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, clip=self.clip
        )

    @property
    def spec(self) -> FormatSpec:
        return self._spec


@dataclass(frozen=True)
class EstimateInputs:
    """What a step's cost depends on, known from shapes alone (the dry run sees a weightless model).

    Attributes:
        layers: the layers this step works on, ``name -> (out_features, in_features)``.
        block_params: parameters of the largest block.
        blocks: number of blocks.
        calibration_tokens: tokens of calibration data that go through every block.
        device: where blocks are processed (``cpu``, ``cuda``).
    """

    layers: dict[str, tuple[int, int]]
    block_params: int
    blocks: int
    calibration_tokens: int
    device: str = "cpu"

    @property
    def largest(self) -> int:
        """Weights of the largest layer."""
        return max((math.prod(shape) for shape in self.layers.values()), default=0)

    @property
    def widest_input(self) -> int:
        return max((shape[1] for shape in self.layers.values()), default=0)


@dataclass(frozen=True)
class StepEstimate:
    """A step's cost for the dry run's plan.

    Attributes:
        memory_bytes: working memory while the step works on one block, on top of the block itself
            and the calibration activations (the pipeline holds those).
        block_passes: forward passes of a block over all calibration tokens the step runs, per block.
        flops: the step's own arithmetic (float32) over the whole model, besides those passes.
    """

    memory_bytes: int = 0
    block_passes: float = 0.0
    flops: float = 0.0


@dataclass
class TransformContext:
    """What a step may need to build its model transform (SpinQuant learns its rotations).

    Attributes:
        calibration: the calibration data (``None`` when the recipe has none).
        batch_size: calibration sequences per forward pass.
        device: where blocks are processed.
        load_model: makes the whole model's weights present (a streamed skeleton reads them all).
        release_model: drops them again (a no-op for a model held in memory).
    """

    calibration: Any = None
    batch_size: int = 8
    device: str = "cpu"
    load_model: Any = None
    release_model: Any = None


class ModelTransform:
    """A change of the whole model's parameterisation that leaves its function unchanged (a rotation
    of the residual stream), applied by the pipeline piece by piece: every block as it loads, the
    captured first-block activations once, and the weights outside the blocks (embeddings, final
    norm, head) where they are held or written. Returned by :meth:`Step.model_transform`."""

    def rotate_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The first block's input as the transformed embeddings produce it."""
        raise NotImplementedError

    def rotate_block(self, index: int) -> None:
        """Transform block ``index`` in place (it was just loaded, untouched by any step)."""
        raise NotImplementedError

    def attach_online(self, index: int) -> None:
        """Re-attach the run-time modules of a block transformed earlier (a resumed run)."""

    def outside_roles(self) -> dict[str, str]:
        """Parameters outside the blocks that change, by name: ``embedding``, ``norm`` or ``head``."""
        raise NotImplementedError

    def rotate_outside(self, role: str, tensor: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
        """The transformed value of one outside parameter (``norm_weight``: the final norm's original)."""
        raise NotImplementedError

    def untie(self, model: nn.Module) -> None:
        """Give a tied head its own weight, when the transform treats it differently from the embeddings."""

    def rotate_model_outside(self, model: nn.Module) -> None:
        """Transform the outside parameters of a model held in memory."""
        raise NotImplementedError

    def config_updates(self) -> dict[str, Any]:
        """Entries the saved ``config.json`` needs (e.g. the online rotations to attach on load)."""
        return {}


class Step:
    """Base class of recipe steps. Subclasses set ``name``, ``Config`` and implement ``apply``;
    steps whose cost differs from rounding each weight once also override ``estimate``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[StepConfig]] = StepConfig
    #: the step reads activations captured from calibration data
    needs_calibration: ClassVar[bool] = False
    #: the step commits quantized weights (rather than only transforming them)
    quantizes_weights: ClassVar[bool] = False

    def __init__(self, config: StepConfig | dict[str, Any] | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise TypeError("pass either a config object or keyword arguments, not both")
        if isinstance(config, StepConfig):
            if not isinstance(config, self.Config):
                raise TypeError(f"{self.name} takes a {self.Config.__name__}, got {type(config).__name__}")
            self.config = config
        else:
            self.config = validate_config(self.Config, config if config is not None else kwargs, self.name)
        #: set by the pipeline: a later step of the recipe quantizes the same layers
        self.followed_by_quantizer = False
        if self.activation_scheme is not None and not self.activation_scheme.dynamic:
            self.needs_calibration = True  # static activation scales are calibrated on data

    @property
    def activation_scheme(self) -> ActivationScheme | None:
        """How the inputs of this step's layers are quantized at run time (``None``: not at all)."""
        return getattr(self.config, "input_activations", None)

    def quantize_inputs(self, unit: Unit) -> None:
        """Called by the pipeline after :meth:`apply`: attach the input quantizers of the layers this
        step rounded in ``unit`` (calibrating static scales on the unit's calibration inputs, which
        reach each layer through the unit's already-quantized weights)."""
        scheme = self.activation_scheme
        if scheme is None:
            return
        layers = {
            n: m
            for n, m in unit.linears.items()
            if (r := unit.state.results.get(n)) is not None and r.method == self.name and r.activations is None
        }
        if layers:
            attach_activation_quantizers(unit, layers, scheme)

    def apply(self, unit: Unit) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def model_transform(self, adapter, context: TransformContext) -> ModelTransform | None:
        """The whole-model transform this step makes (rotations), which the pipeline applies to every
        block as it loads and to the weights outside the blocks; ``None`` for per-unit steps."""
        return None

    def finish(self) -> None:
        """Called once after the last unit (for steps that keep state across blocks)."""

    def writes_group_index(self) -> bool:
        """Whether this step's layers may come with a ``g_idx`` (columns grouped out of order), which
        some checkpoint formats cannot store."""
        return False

    def integer_zero_points(self) -> bool:
        """Whether this step's asymmetric zero-points are integers (HQQ's are not), as integer-only
        checkpoint formats need."""
        return True

    def estimate(self, inputs: EstimateInputs) -> StepEstimate:
        """Memory and time this step needs (for ``--dry-run``). The default fits a data-free step
        that rounds each weight once: a float32 copy of the largest weight and its rounded values."""
        return StepEstimate(memory_bytes=2 * 4 * inputs.largest)

    def to_dict(self) -> dict[str, Any]:
        return {self.name: self.config.model_dump(mode="json", exclude_defaults=True)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def attach_activation_quantizers(unit: Unit, layers: dict[str, Any], scheme: ActivationScheme) -> None:
    """Attach ``scheme``'s input quantizer to ``layers`` of ``unit``, static scales calibrated first
    (all layers in one pass over the calibration inputs, before any of them quantizes its input)."""
    scales: dict[str, torch.Tensor | None] = dict.fromkeys(layers)
    if not scheme.dynamic:
        if not unit.has_calibration:
            raise RuntimeError(f"{unit.name or 'head'}: static activation scales need calibration data")
        fraction = min(1.0, scheme.max_tokens / max(1, unit.inputs.tokens()))
        observers = {n: StaticObserver(scheme, fraction) for n in layers}
        unit.collect(layers, lambda n, x: observers[n].add(x))
        # rounded to the dtype the checkpoint stores it in, so the saved model computes what this one does
        stored = unit.inputs.hidden[0].dtype
        scales = {n: o.scale().to(stored).float() for n, o in observers.items()}
    for name, module in layers.items():
        attach_input_quantizer(module, scheme, scales[name])
        unit.state.results[name].activations = scheme.label()
        unit.state.results[name].activation_bits = scheme.bits


def validate_config(cls: type[StepConfig], data: dict[str, Any], step: str) -> StepConfig:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise StepConfigError(step, exc) from None
    except ValueError as exc:  # raised by model_post_init (format building)
        raise StepConfigError(step, exc) from None


class StepConfigError(ValueError):
    """A step's configuration is invalid; the message names the step and the field."""

    def __init__(self, step: str, exc: Exception):
        if isinstance(exc, ValidationError):
            parts = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"]) or "config"
                parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
            detail = "; ".join(parts)
        else:
            detail = str(exc)
        super().__init__(f"step {step!r}: {detail}")


STEPS: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator that makes a step available to recipes under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in STEPS and STEPS[cls.name] is not cls:
        raise ValueError(f"a step named {cls.name!r} is already registered ({STEPS[cls.name].__name__})")
    STEPS[cls.name] = cls
    return cls


def build_step(name: str, config: dict[str, Any] | None = None) -> Step:
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; known steps: {', '.join(sorted(STEPS))}")
    return STEPS[name](config or {})
